"""facenet-pytorch -> Flax: the torch-free .pt reader, the converter, parity with torch, the CLI."""

import collections
import io
import os
import pathlib
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from ipsr_jax import api  # noqa: E402
from ipsr_jax.models import convert, pt_reader  # noqa: E402
from ipsr_jax.tools import convert_facenet  # noqa: E402
from tests.conftest import facenet_pytorch_module, facenet_pytorch_root  # noqa: E402

NUM_CLASSES = 10


def _facenet_root() -> pathlib.Path:
  return facenet_pytorch_root()


def _load_irv1():
  return facenet_pytorch_module('inception_resnet_v1').InceptionResnetV1


@pytest.fixture(scope='module')
def torch_peer(tmp_path_factory):
  """A random facenet model with randomised BatchNorm, saved to a .pt file, plus its outputs."""
  torch.manual_seed(0)
  model = _load_irv1()(pretrained=None, classify=True, num_classes=NUM_CLASSES).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    model.logits.weight.normal_(0.0, 0.1, generator=g)  # logits of order 1, not 0.01
  path = tmp_path_factory.mktemp('facenet') / 'irv1.pt'
  torch.save(model.state_dict(), path)

  images = np.random.default_rng(0).uniform(0, 255, (3, 160, 160, 3)).astype(np.float32)
  x = torch.from_numpy((images - 127.5) / 128.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    logits = model(x).numpy()
    model.classify = False
    embeddings = model(x).numpy()
  n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith('logits.'))
  return dict(path=path, images=images, logits=logits, embeddings=embeddings, n_params=n_params,
              state_dict={k: v.numpy() for k, v in model.state_dict().items()})


# ----------------------------------------------------------------------------- parity with torch

def test_embeddings_match_facenet_pytorch(torch_peer):
  with jax.default_matmul_precision('highest'):
    emb = api.Embedder.from_facenet_pytorch(torch_peer['path'], buckets=(4,))
    ours = emb(torch_peer['images'])
  assert ours.shape == (3, 512) and ours.dtype == np.float32
  assert np.abs(ours - torch_peer['embeddings']).max() <= 1e-5
  assert 'logits' not in emb.variables['params']  # num_classes=None leaves the head out


def test_logits_match_facenet_pytorch(torch_peer):
  module, variables = convert.load_facenet_pytorch(torch_peer['path'], keep_logits=True)
  assert module.num_classes == NUM_CLASSES
  x = (torch_peer['images'] - 127.5) / 128.0
  with jax.default_matmul_precision('highest'):
    logits = jax.jit(lambda v, x: module.apply(v, x, classify=True))(variables, x)
  assert np.abs(torch_peer['logits']).max() > 0.5  # the comparison is not between near-zeros
  assert np.abs(np.asarray(logits) - torch_peer['logits']).max() <= 1e-5


def test_converted_layouts_and_param_count(torch_peer):
  sd = torch_peer['state_dict']
  variables = convert.torch_state_to_flax(sd)
  params, stats = variables['params'], variables['batch_stats']
  n = sum(np.size(x) for x in jax.tree.leaves(params))
  assert n == torch_peer['n_params'] == 23482624
  np.testing.assert_array_equal(params['conv2d_1a']['conv']['kernel'],
                                sd['conv2d_1a.conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['repeat_2_9']['branch1_1']['conv']['kernel'][0, :, 5, 7],
                                sd['repeat_2.9.branch1.1.conv.weight'][7, 5, 0, :])
  np.testing.assert_array_equal(params['repeat_1_4']['conv2d']['bias'], sd['repeat_1.4.conv2d.bias'])
  np.testing.assert_array_equal(params['last_linear']['kernel'], sd['last_linear.weight'].T)
  np.testing.assert_array_equal(params['block8']['branch0']['bn']['scale'],
                                sd['block8.branch0.bn.weight'])
  np.testing.assert_array_equal(stats['last_bn']['var'], sd['last_bn.running_var'])
  np.testing.assert_array_equal(stats['mixed_7a']['branch2_2']['bn']['mean'],
                                sd['mixed_7a.branch2.2.bn.running_mean'])


def test_converter_lists_every_problem(torch_peer):
  sd = dict(torch_peer['state_dict'])
  del sd['repeat_2.3.branch1.2.bn.running_var']
  sd['extra_head.weight'] = np.zeros((2, 2), np.float32)
  sd['block8.conv2d.weight'] = np.zeros((1792, 384, 3, 3), np.float32)
  with pytest.raises(convert.ConversionError) as err:
    convert.torch_state_to_flax(sd)
  msg = str(err.value)
  assert 'missing key: repeat_2.3.branch1.2.bn.running_var' in msg
  assert 'unexpected key: extra_head.weight' in msg
  assert 'wrong shape: block8.conv2d.weight: file (1792, 384, 3, 3)' in msg
  assert '(1792, 384, 1, 1)' in msg
  # A head of another size than asked for is a shape error, too.
  with pytest.raises(convert.ConversionError, match='wrong shape: logits.weight'):
    convert.torch_state_to_flax(torch_peer['state_dict'], num_classes=NUM_CLASSES + 1)


def test_converter_accepts_torch_tensors_and_data_parallel_prefix(torch_peer):
  sd = {f'module.{k}': torch.from_numpy(v) for k, v in torch_peer['state_dict'].items()}
  variables = convert.torch_state_to_flax(sd, num_classes=NUM_CLASSES)
  np.testing.assert_array_equal(variables['params']['logits']['kernel'],
                                torch_peer['state_dict']['logits.weight'].T)


def test_flax_to_torch_state_round_trips(torch_peer):
  sd = torch_peer['state_dict']
  back = convert.flax_to_torch_state(convert.torch_state_to_flax(sd, num_classes=NUM_CLASSES))
  assert sorted(back) == sorted(sd)  # every key, the logits head and BN counters included
  for key, value in sd.items():
    assert back[key].shape == value.shape and back[key].dtype == value.dtype, key
    if not key.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_cli_converts_saves_and_verifies(torch_peer, tmp_path):
  out = tmp_path / 'embedder'
  summary = convert_facenet.convert_file(torch_peer['path'], out, verify_batch=2)
  assert summary['verified'] and summary['max_abs_diff'] == 0.0
  assert summary['params'] == torch_peer['n_params']
  assert summary['module_kwargs']['num_classes'] is None
  assert 'logits.weight' in summary['ignored_keys']
  assert (out / 'embedder.json').exists()
  np.testing.assert_allclose(summary['embedding_norms'], 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------- pt_reader

def test_reads_facenet_mtcnn_weights_like_torch():
  for name in ('pnet.pt', 'rnet.pt', 'onet.pt'):
    path = _facenet_root() / 'data' / name
    ours = pt_reader.read_state_dict(path)
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
      assert ours[k].dtype == v.numpy().dtype and ours[k].shape == tuple(v.shape)
      np.testing.assert_array_equal(ours[k], v.numpy())
  assert pt_reader.read_state_dict(_facenet_root() / 'data' / 'pnet.pt')['conv1.weight'].shape == (
      10, 3, 3, 3)


@pytest.mark.parametrize('zip_format', [True, False])
def test_reads_views_dtypes_and_nesting_like_torch(tmp_path, zip_format):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  obj = {'model': collections.OrderedDict(
      t=base.t(), s=base[1:, ::2], l=torch.arange(5, dtype=torch.int64),
      h=torch.randn(3).half(), b=torch.randn(3).bfloat16(), e=torch.zeros(0, 2),
      flag=torch.tensor([True, False]), p=torch.nn.Parameter(torch.ones(2))), 'epoch': 7}
  path = tmp_path / 'x.pt'
  torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
  assert zipfile.is_zipfile(path) == zip_format
  loaded = pt_reader.load(path)
  assert loaded['epoch'] == 7
  flat = pt_reader.read_state_dict(path)
  assert sorted(flat) == sorted(f'model.{k}' for k in obj['model'])
  for k, v in obj['model'].items():
    want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
    got = flat[f'model.{k}'].astype(np.float32) if v.dtype == torch.bfloat16 else flat[f'model.{k}']
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  assert flat['model.b'].dtype.name == 'bfloat16' and flat['model.h'].dtype == np.float16


def _int(v: int) -> bytes:
  return b'J' + struct.pack('<i', v)  # BININT


def _tuple(values) -> bytes:
  return b'(' + b''.join(_int(v) for v in values) + b't'


def _tensor_pickle(numel: int, size, stride, offset: int = 0) -> bytes:
  """Protocol-2 opcodes of {'w': _rebuild_tensor_v2(<storage 0>, offset, size, stride, ...)}."""
  return (b'\x80\x02}X\x01\x00\x00\x00w'
          b'ctorch._utils\n_rebuild_tensor_v2\n('
          b'(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu'
          + _int(numel) + b'tQ' + _int(offset) + _tuple(size) + _tuple(stride)
          + b'\x89ccollections\nOrderedDict\n)RtRs.')


def _torch_zip(path, pickle_bytes: bytes, storage: bytes = b'', byteorder: str = 'little'):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle_bytes)
    zf.writestr('archive/byteorder', byteorder)
    zf.writestr('archive/data/0', storage)
    zf.writestr('archive/version', '3\n')
  return path


def test_handmade_zip_strides_offset_and_big_endian(tmp_path):
  values = np.arange(12, dtype=np.float32)
  path = _torch_zip(tmp_path / 'a.pt', _tensor_pickle(12, (2, 3), (1, 2), offset=3),
                    values.astype('<f4').tobytes())
  np.testing.assert_array_equal(pt_reader.read_state_dict(path)['w'],
                                [[3, 5, 7], [4, 6, 8]])
  big = _torch_zip(tmp_path / 'b.pt', _tensor_pickle(12, (12,), (1,)),
                   values.astype('>f4').tobytes(), byteorder='big')
  np.testing.assert_array_equal(pt_reader.read_state_dict(big)['w'], values)


def test_out_of_bounds_view_is_refused(tmp_path):
  path = _torch_zip(tmp_path / 'oob.pt', _tensor_pickle(4, (4, 4), (4, 1)),
                    np.zeros(4, np.float32).tobytes())
  with pytest.raises(pt_reader.PtFormatError, match='exceeds its storage'):
    pt_reader.read_state_dict(path)


def test_refuses_code_execution(tmp_path):
  marker = tmp_path / 'pwned'

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  payload = pickle.dumps({'w': Evil()}, protocol=2)
  zip_path = _torch_zip(tmp_path / 'evil.pt', payload)
  with pytest.raises(pt_reader.UnsafePickleError, match='system'):
    pt_reader.read_state_dict(zip_path)
  legacy = io.BytesIO()
  for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
    pickle.dump(header, legacy, protocol=2)
  legacy.write(payload)
  legacy_path = tmp_path / 'evil_legacy.pt'
  legacy_path.write_bytes(legacy.getvalue())
  with pytest.raises(pt_reader.UnsafePickleError):
    pt_reader.read_state_dict(legacy_path)
  eval_payload = b'\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.'
  with pytest.raises(pt_reader.UnsafePickleError, match='builtins.eval'):
    pt_reader.read_state_dict(_torch_zip(tmp_path / 'eval.pt', eval_payload))
  assert not marker.exists()


def test_not_a_torch_file(tmp_path):
  path = tmp_path / 'junk.pt'
  path.write_bytes(b'hello, not a pickle at all')
  with pytest.raises(pt_reader.PtFormatError, match='torch.save'):
    pt_reader.read_state_dict(path)
