"""Shared test setup: CPU only, float32 matmuls at full precision, paths to the shared real data."""

import importlib
import importlib.machinery
import os
import pathlib
import sys
import types

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The suite runs on one CPU device (and so do the programs it starts, unless a test sets its own
# count): compiling every test's programs for one device per core would add minutes on CI.
# tests/test_cpu_devices.py checks that default and that results do not depend on it.
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=1').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from configs import base  # pylint: disable=g-import-not-at-top
from ipsr_jax.models import embedder_store  # pylint: disable=g-import-not-at-top
from ipsr_jax.models import inception_resnet_v1  # pylint: disable=g-import-not-at-top

jax.config.update('jax_default_matmul_precision', 'highest')

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'


# The modules that take longest (minutes on 2 cores, each spent mostly compiling in programs it
# starts), longest first: the workers take modules in collection order, so these start first and
# the short modules fill in behind them (pyproject.toml's addopts: --dist loadfile, no reorder).
LONGEST_MODULES = ('test_train.py', 'test_lfw_run.py', 'test_robustness.py', 'test_demo.py', 'test_aot.py',
                   'test_ema.py', 'test_curve.py')
WORKER_MEMORY = 6 * 2**30  # a worker and the programs its tests start, at their peak


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most one per WORKER_MEMORY of RAM."""
  del config
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return max(1, min(len(os.sched_getaffinity(0)), memory // WORKER_MEMORY))


def pytest_collection_modifyitems(config, items):
  """The longest modules first; tests marked `slow` (whole datasets, full-size compiles) run only
  with IPSR_SLOW=1, each with a fast counterpart in the default run that asserts the same property
  on less."""
  del config
  rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as collected
  if os.environ.get('IPSR_SLOW'):
    return
  skip = pytest.mark.skip(reason='slow: set IPSR_SLOW=1 to run it')
  for item in items:
    if 'slow' in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def shared_data():
  """../shared/data beside the checkout (LFW, ORL); tests using it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real face data not found at {SHARED_DATA}')
  return SHARED_DATA


def facenet_pytorch_root() -> pathlib.Path:
  """The installed facenet-pytorch package folder (installed --no-deps); skips the test without it."""
  spec = importlib.machinery.PathFinder.find_spec('facenet_pytorch')  # ignores stub modules
  if spec is None:
    pytest.skip('facenet-pytorch is not installed')
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def facenet_pytorch_module(name: str):
  """`facenet_pytorch.models.<name>` without running the package __init__ (it imports torchvision)."""
  root = facenet_pytorch_root()
  for package, path in [('facenet_pytorch', root), ('facenet_pytorch.models', root / 'models'),
                        ('facenet_pytorch.models.utils', root / 'models' / 'utils')]:
    module = types.ModuleType(package)
    module.__path__ = [str(path)]
    sys.modules.setdefault(package, module)
  return importlib.import_module(f'facenet_pytorch.models.{name}')


# A tiny training run and a random embedder, shared by the inference and export tests (one run
# per test session instead of one per module).
EMBEDDER_KWARGS = dict(width=0.125, embedding_size=64)
EMBEDDER_INPUT = 80  # the tiny config's embedder.input_size


def make_run(workdir):
  """Two steps of the tiny config (32x32 faces, ngf=4): config.json + an Orbax checkpoint."""
  from ipsr_jax.training import train  # pylint: disable=import-outside-toplevel  (TF via clu: import late)
  config = base.get_config('tiny')
  config.loss.identity_weight = 0.0       # no embedder needed to train the generator
  config.train.num_train_steps = 2
  config.train.image_summary_every_steps = 0
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def make_embedder(directory, seed=0):
  module = inception_resnet_v1.InceptionResnetV1(**EMBEDDER_KWARGS)
  variables = inception_resnet_v1.init_variables(module, seed)  # numpy: no slow init compile
  rng = np.random.default_rng(seed)  # non-trivial BatchNorm statistics, as a trained net has
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.uniform(0.5, 1.5, a.shape) if 'var' in jax.tree_util.keystr(path)
                       else rng.normal(0.0, 0.1, a.shape)).astype(a.dtype),
      variables['batch_stats'])
  embedder_store.save_embedder(directory, variables, module_kwargs=EMBEDDER_KWARGS,
                               source='random test init')
  return str(directory)


@pytest.fixture(scope='session')
def run_dir(tmp_path_factory):
  return make_run(tmp_path_factory.mktemp('run') / 'tiny')


@pytest.fixture(scope='session')
def embedder_dir(tmp_path_factory):
  return make_embedder(tmp_path_factory.mktemp('embedder') / 'e')
