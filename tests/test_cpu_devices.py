"""One XLA CPU device per core by default (ipsr_jax/runtime/cpu_devices.py), the user's choice kept, and
embeddings and SR faces that depend neither on the count nor on the inference fusion (training losses on 1 vs N CPU devices and
a resume across a change of it: tests/test_train.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from ipsr_jax.runtime import cpu_devices
from tests.conftest import EMBEDDER_INPUT, REPO
from tests.test_train import make_embedder

# The same float32 programs sharded over more devices differ only in summation order.
EMBEDDING_ATOL = 1e-5   # unit embeddings
SR_ATOL = 1e-3          # float SR pixels, 0..255


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', cpu_devices.ENV, cpu_devices.FUSION_ENV, 'SLURM_NTASKS',
                      'JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES')}
  return {**env, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO), **extra}


def _device_count(env):
  out = subprocess.run([sys.executable, '-c', 'from ipsr_jax.runtime import cpu_devices; cpu_devices.configure(); '
                        'import jax; print(jax.device_count())'],
                       env=env, capture_output=True, text=True, timeout=300, check=True)
  return int(out.stdout.split()[-1])


def test_resolve_and_users_choice(monkeypatch):
  assert cpu_devices.resolve('auto') == cpu_devices.cores() == len(os.sched_getaffinity(0))
  assert cpu_devices.resolve(3) == cpu_devices.resolve('3') == 3
  for bad in (0, -1, 'many', None):
    with pytest.raises(ValueError, match="must be 'auto' or a number >= 1"):
      cpu_devices.resolve(bad)
  for name in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES'):
    monkeypatch.delenv(name, raising=False)
  assert cpu_devices.users_choice() is None
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert 'XLA_FLAGS' in cpu_devices.users_choice()


def test_importing_the_package_leaves_the_devices_alone():
  code = 'import ipsr_jax, ipsr_jax.api, ipsr_jax.main, jax; print(jax.device_count())'
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_clean_env(),
                       capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.split()[-1] == '1'  # JAX's own default: the entry points configure


def test_default_is_one_device_per_core_and_the_users_choice_wins():
  assert _device_count(_clean_env()) == cpu_devices.cores()
  assert _device_count(_clean_env(XLA_FLAGS='--xla_force_host_platform_device_count=3')) == 3
  assert _device_count(_clean_env(JAX_NUM_CPU_DEVICES='2')) == 2
  assert _device_count(_clean_env(IPSR_CPU_DEVICES='3')) == 3
  # One process of several (jax.distributed): one device each, as the processes may share cores.
  assert _device_count(_clean_env(SLURM_NTASKS='2')) == 1
  # Pinned to one core (taskset, a cpuset, a SLURM binding): one device.
  if hasattr(os, 'sched_setaffinity'):
    out = subprocess.run([sys.executable, '-c', 'import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); '
                          'from ipsr_jax.runtime import cpu_devices; cpu_devices.configure(); '
                          'import jax; print(jax.device_count())'],
                         env=_clean_env(), capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == '1'


_OUTPUTS = r'''
import os, sys
import numpy as np
import jax
from benchmarks.onnx_sr import random_variables
from ipsr_jax import api
from ipsr_jax.models import unet
from ipsr_jax.runtime import cpu_devices
rng = np.random.default_rng(0)
faces = rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)  # 11: padded to every bucket size
lr = rng.integers(0, 256, (11, 8, 7, 3), dtype=np.uint8)
generator = unet.UNet(ngf=8, num_downs=5, residual=True)  # arctanh: wrong under the embedder's fusion
for fusion in sys.argv[4:]:  # IPSR_CPU_FUSION, read at each compile: new objects compile anew
  os.environ[cpu_devices.FUSION_ENV] = fusion
  emb = api.Embedder.from_checkpoint(sys.argv[1], input_size=int(sys.argv[3]))  # first: it sets the device count
  sr = api.SuperResolver(generator, random_variables(generator, (1, 32, 32, 3)), image_size=32)
  np.savez(sys.argv[2] + fusion, devices=jax.device_count(), embeddings=emb(faces), sr=sr(lr.astype(np.float32)),
           pipeline=api.Pipeline(sr, emb, mode='concat')(lr))
'''


def test_embeddings_and_sr_do_not_depend_on_the_device_count(tmp_path):
  embedder = make_embedder(tmp_path / 'embedder')
  (tmp_path / 'outputs.py').write_text(_OUTPUTS)
  results = {}
  # One device with XLA's fusions against the default on 3 cores (the embedder's fusion on by
  # default), and fusion alone. SR must not take the fusion: its residual generator's arctanh would
  # be off by whole grey levels (test_only_the_embedder_compiles_with_the_fusion).
  # The fusion switch is read at each compile, so one device's two settings share a process.
  for count, fusions in (('1', ('0', '1')), ('3', ('1',))):
    out = tmp_path / f'out{count}_'
    subprocess.run([sys.executable, str(tmp_path / 'outputs.py'), embedder, str(out), str(EMBEDDER_INPUT), *fusions],
                   cwd=REPO, env=_clean_env(IPSR_CPU_DEVICES=count), check=True, timeout=600)
    for fusion in fusions:
      results[count + fusion] = np.load(f'{out}{fusion}.npz')
  old = results['10']
  assert int(old['devices']) == 1 and int(results['31']['devices']) == 3
  for new in (results['31'], results['11']):
    np.testing.assert_allclose(new['embeddings'], old['embeddings'], atol=EMBEDDING_ATOL, rtol=0)
    np.testing.assert_allclose(new['sr'], old['sr'], atol=SR_ATOL, rtol=0)
    np.testing.assert_allclose(new['pipeline'], old['pipeline'], atol=EMBEDDING_ATOL, rtol=0)


def test_cpu_mesh_uses_the_most_devices_the_batch_splits_over():
  """Batch 16 on 3 CPU devices (a 3-core machine's default) trains on 2 of them instead of failing."""
  code = ('from ipsr_jax.runtime import cpu_devices, sharding; cpu_devices.configure(); from configs import base; '
          'm = base.get_config().mesh; print(sharding.make_mesh(m, 16).devices.size, sharding.make_mesh(m, 12).devices.size, '
          'sharding.make_mesh(m).devices.size)')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=_clean_env(IPSR_CPU_DEVICES='3'),
                       capture_output=True, text=True, timeout=300, check=True)
  assert out.stdout.split()[-3:] == ['2', '3', '3']


def test_embedder_fusion_switches(monkeypatch):
  for name in ('XLA_FLAGS', cpu_devices.FUSION_ENV):
    monkeypatch.delenv(name, raising=False)
  assert cpu_devices.embedder_compiler_options('cpu') == cpu_devices.EMBEDDER_FUSION
  assert cpu_devices.embedder_compiler_options('gpu') == cpu_devices.embedder_compiler_options('tpu') == {}
  monkeypatch.setattr(cpu_devices, '_embedder_fusion', True)
  cpu_devices.configure_from({'cpu_devices': 'auto', 'cpu_embedder_fusion': False})
  assert cpu_devices.embedder_compiler_options('cpu') == {}
  monkeypatch.setenv(cpu_devices.FUSION_ENV, '1')  # the environment wins over the config
  assert cpu_devices.embedder_compiler_options('cpu') == cpu_devices.EMBEDDER_FUSION
  monkeypatch.setenv(cpu_devices.FUSION_ENV, 'maybe')
  with pytest.raises(ValueError, match='must be 0 or 1'):
    cpu_devices.embedder_fusion()
  monkeypatch.setenv(cpu_devices.FUSION_ENV, '1')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=-individual_dot')
  assert cpu_devices.embedder_compiler_options('cpu') == {}  # the user's own fusion list wins


_PROGRAM = r'''
import hashlib, os, re, sys
import numpy as np
from ipsr_jax.models import inception_resnet_v1 as irv1
from ipsr_jax.ops import batching
from ipsr_jax.runtime import cpu_devices
module = irv1.InceptionResnetV1(width=0.125, embedding_size=16)
x = np.ones((2, 80, 80, 3), np.float32)
variables = irv1.init_variables(module, 0)  # numpy: only the program under test is compiled
fn = lambda v, images: module.apply(v, images)
def digest(compiled):  # the program without source locations
  text = re.sub(r'(, metadata=\{[^}]*\})|(stack_frame_id=\d+)', '', compiled.as_text())
  return hashlib.sha256(text.encode()).hexdigest()[:16]
for fusion in sys.argv[1:]:  # IPSR_CPU_FUSION for each compile ('-': unset); read when the batcher compiles
  os.environ.pop(cpu_devices.FUSION_ENV, None)
  if fusion != '-':
    os.environ[cpu_devices.FUSION_ENV] = fusion
  batcher = batching.PaddedBatcher(lambda images, v: fn(v, images), buckets=(2,), cpu_fusion=True)  # as Embedder
  batcher(x, variables)
  print(digest(next(iter(batcher._executables.values()))))
'''


def test_embedder_fusion_is_xlas_default_list_plus_elementwise(tmp_path):
  """EMBEDDER_FUSION replaces XLA's list of YNNPACK fusion types: it must equal the default list
  plus 'eltwise' (what the +eltwise flag compiles), or an XLA upgrade that changes the default
  would silently drop fusions. The embedder's PaddedBatcher compiles with it; XLA's default differs."""
  script = tmp_path / 'program.py'
  script.write_text(_PROGRAM)
  def run(*fusions, **env):
    return subprocess.run([sys.executable, str(script), *fusions], cwd=REPO,
                          env=_clean_env(IPSR_CPU_DEVICES='1', **env),
                          capture_output=True, text=True, timeout=600, check=True).stdout.split()
  # XLA reads XLA_FLAGS once, at start-up: the flag's program needs a process of its own (the
  # user's flag wins over the fusion on by default). The fusion's switch is read at each compile:
  # on by default and off are two compiles in one process.
  flag, = run('-', XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=+eltwise')
  fused, default = run('-', '0')
  assert fused == flag
  assert default != flag


def test_only_the_embedder_compiles_with_the_fusion():
  """The YNNPACK elementwise fusion computes arctanh(clip(x)) wrongly (off by up to 3.8 with jax
  0.10.2): SuperResolver and Pipeline (the residual generator) keep XLA's fusions."""
  from ipsr_jax.serving import inference  # pylint: disable=import-outside-toplevel
  assert inference.Embedder.cpu_fusion
  assert not inference.SuperResolver.cpu_fusion and not inference.Pipeline.cpu_fusion
