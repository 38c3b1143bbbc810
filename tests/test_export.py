"""jax.export artifacts: written by the CLI and the library, loaded in a fresh process that imports
no model code, they reproduce the API's outputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ipsr_jax import api
from ipsr_jax.serving import jax_export as export_lib
from ipsr_jax.tools import export as export_tool
from tests.conftest import REPO
from tests.conftest import EMBEDDER_INPUT


@pytest.fixture(scope='module')
def sr(run_dir):
  return api.SuperResolver.from_checkpoint(run_dir)


FRESH = r'''
import json, sys
import numpy as np
from ipsr_jax.serving import jax_export
inputs = np.load(sys.argv[1])
outputs = {}
for name, path, function in json.loads(sys.argv[2]):
  fn = jax_export.load(path, function)
  for n in (1, 5, 11):
    out = fn(inputs[name][:n])
    for key, value in (out.items() if isinstance(out, dict) else [('out', out)]):
      outputs[f'{name}/{n}/{key}'] = value
  outputs[f'{name}/compiled'] = np.array(sorted(fn.compiled_sizes))
np.savez(sys.argv[3], **outputs)
model_code = sorted(m for m in sys.modules
                    if m.split('.')[0] in ('flax', 'optax', 'orbax') or m.startswith(
                        ('ipsr_jax.models', 'ipsr_jax.serving.inference', 'ipsr_jax.training.train', 'ipsr_jax.api')))
print(json.dumps(model_code))
'''


def test_round_trip_in_a_fresh_process(run_dir, embedder_dir, sr, tmp_path):
  # 1. The CLI: SR + SR->embedder (concat), inputs at the model size, for three platforms.
  cli_file = tmp_path / 'probe.jaxexport'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  rel = lambda p: os.path.relpath(p, tmp_path)  # relative paths, as README writes them
  result = subprocess.run(
      [sys.executable, '-m', 'ipsr_jax.tools.export', f'--workdir={rel(run_dir)}',
       f'--embedder={rel(embedder_dir)}', '--mode=concat', f'--out={cli_file.name}'],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'reloaded; max |export - api|' in result.stdout
  header = export_lib.read_header(cli_file)
  assert header['default'] == 'sr_embed' and set(header['functions']) == {'sr', 'sr_embed'}
  assert header['metadata']['step'] == 2 and header['metadata']['mode'] == 'concat'
  for info in header['functions'].values():
    assert info['input'] == dict(shape=[None, 32, 32, 3], dtype='float32', range='0..255')
    assert info['platforms'] == ['cpu', 'cuda', 'tpu']
  assert header['functions']['sr_embed']['output']['embedding']['shape'] == [None, 128]
  assert header['weights']['groups']['embedder']['arrays'] > 100

  # 2. The library: SR only, uint8 LR faces of 8x6 (the bicubic resize inside), CPU only.
  lr_file = tmp_path / 'sr_8x6_uint8.jaxexport'
  export_lib.save(lr_file, {'sr': export_lib.export_super_resolver(
      sr, lr_size=(8, 6), input_dtype='uint8', platforms=('cpu',))})
  assert export_lib.read_header(lr_file)['functions']['sr']['input']['shape'] == [None, 8, 6, 3]

  rng = np.random.default_rng(0)
  inputs = {'model_size': rng.uniform(0, 255, (11, 32, 32, 3)).astype(np.float32),
            'lr': rng.integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)}
  np.savez(tmp_path / 'inputs.npz', **inputs)
  jobs = [('model_size', str(cli_file), None), ('lr', str(lr_file), 'sr')]
  result = subprocess.run(
      [sys.executable, '-c', FRESH, str(tmp_path / 'inputs.npz'), json.dumps(jobs),
       str(tmp_path / 'outputs.npz')], env=env, cwd=REPO, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # no model code was imported
  got = np.load(tmp_path / 'outputs.npz')

  pipe = api.Pipeline(sr, api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT),
                      mode='concat')
  x, lr = inputs['model_size'], inputs['lr']
  for n in (1, 5, 11):
    np.testing.assert_allclose(got[f'model_size/{n}/embedding'], pipe(x[:n]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[f'model_size/{n}/sr'], sr(x[:n]), rtol=0, atol=1e-5 * 255)
    np.testing.assert_array_equal(got[f'lr/{n}/out'], sr(lr[:n]))
  assert got['lr/11/out'].dtype == np.uint8 and got['lr/11/out'].shape == (11, 32, 32, 3)
  assert list(got['model_size/compiled']) == [8, 64]  # 1 and 5 -> 8, 11 -> 64: padded buckets
  assert np.ptp(got['model_size/11/sr']) > 1.0


def test_loaded_function_checks_its_inputs(sr, tmp_path):
  path = tmp_path / 'sr.jaxexport'
  export_lib.save(path, {'sr': export_lib.export_super_resolver(sr, platforms=('cpu',))})
  fn = export_lib.load(path)
  assert fn.name == 'sr' and fn.input_shape == (None, 32, 32, 3)
  x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  # uint8 into a float32 function: exact values, float output as for float input to the API.
  np.testing.assert_allclose(fn(x), sr(x.astype(np.float32)), atol=1e-5 * 255)
  np.testing.assert_allclose(fn(x[0]), fn(x)[0], atol=1e-5 * 255)  # one image
  with pytest.raises(ValueError, match='32, 32, 3'):
    fn(np.zeros((2, 16, 16, 3), np.float32))
  bad = x.astype(np.float32)
  bad[2, 0, 0, 1] = np.nan  # the API's input contract: no silent all-NaN face
  with pytest.raises(ValueError, match=r'non-finite pixels \(NaN or inf\) in image 2 of 3'):
    fn(bad)
  with pytest.raises(TypeError, match='got int64'):
    fn(x.astype(np.int64))
  np.testing.assert_allclose(fn(x / 255.0, input_range=(0, 1)), fn(x.astype(np.float32)), atol=1e-3)
  with pytest.raises(KeyError):
    export_lib.load(path, 'sr_embed')
  bogus = tmp_path / 'bogus.bin'
  bogus.write_bytes(b'not an export at all')
  with pytest.raises(ValueError, match='not an ipsr_jax export'):
    export_lib.load(bogus)
  tpu_only = tmp_path / 'tpu.jaxexport'
  export_lib.save(tpu_only, {'sr': export_lib.export_super_resolver(sr, platforms=('tpu',))})
  with pytest.raises(ValueError, match='exported for'):
    export_lib.load(tpu_only)


def test_parse_size():
  assert export_tool.parse_size('16x12') == (16, 12) and export_tool.parse_size('16') == (16, 16)
  assert export_tool.parse_size('') is None
  for bad in ('16x', 'ax3', '0x4', '1x2x3'):
    with pytest.raises(ValueError):
      export_tool.parse_size(bad)
