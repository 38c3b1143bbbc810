"""SuperResolver / Pipeline on a real (tiny) training run, and the folder CLIs built on them."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ipsr_jax import api
from ipsr_jax.runtime import checkpointing
from ipsr_jax.serving import inference
from ipsr_jax.data import image_io
from ipsr_jax.data.image_folder import ImageFolder
from ipsr_jax.models import embedder_store
from ipsr_jax.models import inception_resnet_v1
from ipsr_jax.models import unet as unet_lib
from ipsr_jax.ops import pixels as pixels_lib
from ipsr_jax.ops import resize as resize_lib
from ipsr_jax.tools import embed as embed_tool
from ipsr_jax.tools import super_resolve as sr_tool
from tests.conftest import EMBEDDER_INPUT, REPO


@pytest.fixture(scope='module')
def sr(run_dir):
  return api.SuperResolver.from_checkpoint(run_dir)


@pytest.fixture(scope='module')
def embedder(embedder_dir):
  return api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT)


@pytest.fixture(scope='module')
def pipe(sr, embedder):
  """mode 'sr' with small buckets: cheap compiles for the tests that share it."""
  return api.Pipeline(sr, embedder, mode='sr', buckets=(4, 8))


@pytest.fixture(scope='module')
def direct(run_dir):
  """The generator applied the training code's way, straight from the checkpoint."""
  from ipsr_jax.training import train  # pylint: disable=import-outside-toplevel
  config = inference.load_run_config(run_dir)
  generator = unet_lib.from_config(config.model)
  _, variables = checkpointing.Checkpointer(run_dir, read_only=True).restore_model()
  apply = jax.jit(lambda x: pixels_lib.to_pixels(train.sr_apply(generator, variables,
                                                            pixels_lib.from_pixels(x))))
  return lambda pixels: np.asarray(apply(jnp.asarray(pixels, jnp.float32)))


def pil_bicubic(images, size):
  return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC))
                   for x in images])


def test_api_reexports():
  assert api.SuperResolver is inference.SuperResolver and api.Pipeline is inference.Pipeline
  assert api.Embedder is inference.Embedder and api.load_embedder is inference.load_embedder


def test_one_batched_base_and_a_one_way_dependency(sr, embedder, pipe):
  # inference never imports api (api re-exports inference): no import cycle.
  tree = ast.parse(pathlib.Path(inference.__file__).read_text())
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      imported |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
  assert 'ipsr_jax.api' not in imported and 'ipsr_jax.serving.inference' in {
      n.module for n in ast.walk(ast.parse(pathlib.Path(api.__file__).read_text()))
      if isinstance(n, ast.ImportFrom)}
  for model in (sr, embedder, pipe):
    assert isinstance(model, inference.BatchedModel)
  assert pipe.buckets == (4, 8) and sr.buckets == (8, 64, 256)
  assert embedder.buckets == inference.EMBEDDER_CPU_BUCKETS == (8,)  # this CPU
  assert pipe.mesh is sr.mesh  # one device here: None
  assert sr.mesh is None and jax.local_device_count() == 1


def test_sr_equals_direct_apply(sr, direct):
  assert sr.image_size == 32 and sr.info['step'] == 2
  rng = np.random.default_rng(0)
  # Float at the model size: exactly the generator.
  x = rng.uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
  out = sr(x)
  assert out.dtype == np.float32 and out.shape == (5, 32, 32, 3)
  np.testing.assert_allclose(out, direct(x), rtol=0, atol=1e-3)
  assert np.ptp(out) > 1.0  # a real image, not a constant
  # Float LR: unrounded bicubic to 32, then the generator.
  lr = rng.uniform(0, 255, (3, 8, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(sr(lr), direct(resize_lib.resize_np(lr, (32, 32))), atol=1e-3)
  # uint8 LR: PIL's uint8 bicubic, the generator, rounded to uint8.
  lr8 = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
  out8 = sr(lr8)
  want = np.clip(np.round(direct(pil_bicubic(lr8, 32))), 0, 255)
  assert out8.dtype == np.uint8 and out8.shape == (4, 32, 32, 3)
  diff = np.abs(out8.astype(np.int32) - want.astype(np.int32))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # only ties at .5 may round apart
  # One image in, one out.
  np.testing.assert_array_equal(sr(lr8[1]), out8[1])
  # Larger than the model: a bicubic downscale, also fine.
  big = rng.uniform(0, 255, (2, 50, 40, 3)).astype(np.float32)
  np.testing.assert_allclose(sr(big), direct(resize_lib.resize_np(big, (32, 32))), atol=1e-3)
  with pytest.raises(ValueError):
    sr(np.zeros((2, 8, 8), np.float32))


def test_fixed_batch_sizes(run_dir, direct):
  sr = api.SuperResolver.from_checkpoint(run_dir)  # fresh: count its compilations from zero
  assert sr.buckets == (8, 64, 256)
  x = np.random.default_rng(1).uniform(0, 255, (300, 32, 32, 3)).astype(np.float32)
  out1, out7 = sr(x[:1]), sr(x[:7])
  assert sr.compiled_sizes == {8} and sr.num_compilations == 1
  out300 = sr(x)                                 # 256 + 44 padded to 64
  assert sr.compiled_sizes == {8, 64, 256} and sr.num_compilations == 3
  for n in (1, 7, 300, 5, 64, 257):
    assert sr(x[:n]).shape == (n, 32, 32, 3)
  assert sr.compiled_sizes == {8, 64, 256} and sr.num_compilations == 3  # no recompilation
  assert sr(x[:0]).shape == (0, 32, 32, 3)
  np.testing.assert_allclose(out300, direct(x), atol=1e-3)
  np.testing.assert_allclose(out1, out300[:1], atol=1e-3)
  np.testing.assert_allclose(out7, out300[:7], atol=1e-3)


def test_stream(sr):
  rng = np.random.default_rng(2)
  batches = [rng.integers(0, 256, (n, 16, 12, 3), dtype=np.uint8) for n in (5, 9, 1)]
  streamed = list(sr.stream(iter(batches)))
  assert [len(s) for s in streamed] == [5, 9, 1]
  np.testing.assert_array_equal(np.concatenate(streamed), sr(np.concatenate(batches)))

  def failing():
    yield batches[0]
    raise OSError('disk gone')

  with pytest.raises(OSError, match='disk gone'):
    list(sr.stream(failing()))
  # Stopping early leaves nothing running that blocks.
  endless = (batches[1] for _ in iter(int, 1))
  for i, _ in enumerate(sr.stream(endless)):
    if i == 2:
      break


def test_pipeline_modes(sr, embedder, pipe, direct, embedder_dir):
  module, evars, _ = embedder_store.load_embedder(embedder_dir)
  embed = jax.jit(lambda px: inception_resnet_v1.embed_images(module, evars, px, EMBEDDER_INPUT))
  rng = np.random.default_rng(3)
  lr = rng.uniform(0, 255, (6, 8, 6, 3)).astype(np.float32)
  bicubic = resize_lib.resize_np(lr, (32, 32))
  e_bicubic = np.asarray(embed(bicubic))
  e_sr = np.asarray(embed(direct(bicubic)))
  assert np.abs(e_sr - e_bicubic).max() > 1e-3  # SR changes the embedding
  got = {'sr': pipe(lr)}
  for mode in ('bicubic', 'concat'):
    got[mode] = api.Pipeline(sr, embedder, mode=mode, buckets=(8,))(lr)
  for mode, e in got.items():
    assert e.shape == (6, 128 if mode == 'concat' else 64) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  assert pipe.embedding_size == 64
  np.testing.assert_allclose(got['sr'], e_sr, atol=2e-5)
  np.testing.assert_allclose(got['bicubic'], e_bicubic, atol=2e-5)
  np.testing.assert_allclose(got['concat'], np.concatenate([e_bicubic, e_sr], -1) / np.sqrt(2),
                             atol=2e-5)
  # The pipeline equals the two public calls chained (float input: SR unrounded).
  np.testing.assert_allclose(got['sr'], embedder(sr(lr)), atol=2e-5)
  many, e_many = np.repeat(lr, 3, axis=0), np.repeat(e_sr, 3, axis=0)
  for n in (1, 7, 13):  # buckets 4, 8, and 8 + 5 padded to 8
    np.testing.assert_allclose(pipe(many[:n]), e_many[:n], atol=2e-5)
  assert pipe.compiled_sizes == {4, 8} and pipe.num_compilations == 2
  with pytest.raises(ValueError):
    api.Pipeline(sr, embedder, mode='mean')


def test_sharded_over_two_local_devices(run_dir, sr, tmp_path):
  """Two local devices: buckets split evenly over them, same outputs as one device."""
  x = np.random.default_rng(4).integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)
  np.save(tmp_path / 'x.npy', x)
  script = (
      'import sys, numpy as np, jax\n'
      'from ipsr_jax import api\n'
      'assert jax.local_device_count() == 2\n'
      f'sr = api.SuperResolver.from_checkpoint({run_dir!r})\n'
      f'x = np.load({str(tmp_path / "x.npy")!r})\n'
      'leaf = jax.tree.leaves(sr.variables)[0]\n'
      'assert len(leaf.sharding.device_set) == 2, leaf.sharding\n'
      'np.save(sys.argv[1], sr(x))\n'
      'print(sorted(sr.compiled_sizes))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'y.npy')], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[64]'  # 11 rows: the bucket that fits
  y = np.load(tmp_path / 'y.npy')
  diff = np.abs(y.astype(np.int32) - sr(x).astype(np.int32))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ------------------------------------------------------------------------------- folders, CLIs


def write_probe_folder(root):
  """LR faces in nested folders: mixed sizes and formats, a grey PGM, a name clash, one corrupt
  file, a non-image and a hidden folder (both ignored)."""
  rng = np.random.default_rng(5)
  files = {'a/1.png': (8, 6), 'a/2.jpg': (16, 16), 'b/c/3.pgm': (8, 6), 'b/3.png': (32, 32),
           'b/3.jpg': (7, 6), '10.png': (8, 6), '9.png': (8, 6)}
  for name, (h, w) in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, (h, w) if name.endswith('.pgm') else (h, w, 3), dtype=np.uint8)
    Image.fromarray(image).save(path, **({'quality': 95} if name.endswith('.jpg') else {}))
  (root / 'b' / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is not a jpeg')
  (root / 'notes.txt').write_text('not an image')
  (root / '.hidden').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / '.hidden' / 'x.png')
  return sorted(files)


def test_image_folder(tmp_path):
  write_probe_folder(tmp_path)
  folder = ImageFolder(tmp_path)
  assert folder.names == ['9.png', '10.png', 'a/1.png', 'a/2.jpg', 'b/3.jpg', 'b/3.png',
                          'b/bad.jpg', 'b/c/3.pgm']
  batches = list(folder.batches(2, workers=2))
  assert [u.name for u in folder.unreadable] == ['b/bad.jpg']
  assert 'b/bad.jpg' not in [n for b in batches for n in b.names]
  assert sorted(n for b in batches for n in b.names) == sorted(set(folder.names) - {'b/bad.jpg'})
  for b in batches:  # one shape per batch, at most 2 images, decoded as the pipeline does
    assert len(b.names) <= 2 and b.images.dtype == np.uint8 and b.images.shape[-1] == 3
    for name, image in zip(b.names, b.images):
      np.testing.assert_array_equal(image, image_io.decode_image(tmp_path / name))
  resized = list(folder.batches(3, image_size=32))
  assert [len(b.names) for b in resized] == [3, 3, 1]
  assert all(b.images.shape[1:] == (32, 32, 3) for b in resized)
  single = ImageFolder(tmp_path / 'a' / '1.png')
  assert single.names == ['1.png'] and single.read('1.png').shape == (8, 6, 3)
  with pytest.raises(FileNotFoundError):
    ImageFolder(tmp_path / 'missing')


def test_super_resolve_folder(sr, tmp_path):
  probes = tmp_path / 'probes'
  write_probe_folder(probes)
  out = tmp_path / 'sr'
  report = sr_tool.super_resolve_folder(sr, str(probes), str(out), batch_size=3, progress=False)
  expected = {'9.png': '9.png', '10.png': '10.png', 'a/1.png': 'a/1.png', 'a/2.jpg': 'a/2.png',
              'b/3.jpg': 'b/3.jpg.png', 'b/3.png': 'b/3.png.png', 'b/c/3.pgm': 'b/c/3.png'}
  assert report['outputs'] == expected and report['written'] == 7 and report['total'] == 8
  assert [u['path'] for u in report['unreadable']] == ['b/bad.jpg']
  assert json.loads((out / 'report.json').read_text())['unreadable'] == report['unreadable']
  written = sorted(str(p.relative_to(out)) for p in out.rglob('*.png'))
  assert written == sorted(expected.values())
  for name, result in expected.items():
    image = image_io.decode_image(out / result)
    lr = image_io.decode_image(probes / name)
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, sr(image_io.resize_to(lr, 32)))


def test_embed_folder(sr, embedder, pipe, tmp_path):
  probes = tmp_path / 'probes'
  write_probe_folder(probes)
  folder = ImageFolder(probes)
  readable = [n for n in folder.names if n != 'b/bad.jpg']
  cases = ((tmp_path / 'e.npz', pipe, 32), (tmp_path / 'e.parquet', embedder, 20))
  for output, fn, size in cases:
    report = embed_tool.embed_folder(fn, str(probes), str(output), image_size=size,
                                     batch_size=4, progress=False, metadata={'mode': 'test'})
    assert report['count'] == 7 and report['total'] == 8
    names, vectors, metadata = embed_tool.read_embeddings(str(output))
    assert names == readable
    assert [u['path'] for u in metadata['unreadable']] == ['b/bad.jpg']
    assert metadata['mode'] == 'test' and metadata['embedding_size'] == vectors.shape[1]
    for name, vector in zip(names, vectors):
      image = folder.read(name)
      if size:
        image = image_io.resize_to(image, size)
      np.testing.assert_allclose(vector, fn(image), atol=2e-5)
  with np.load(tmp_path / 'e.npz') as z:
    assert list(z['unreadable']) == ['b/bad.jpg'] and 'Error' in str(z['unreadable_reasons'][0])
    assert z['embeddings'].shape == (7, 64)
  with pytest.raises(ValueError, match='npz or .parquet'):
    embed_tool.check_output('out.csv')


def test_parquet_needs_pyarrow(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pyarrow', None)  # as if not installed
  with pytest.raises(ImportError, match=r'pip install "ipsr_jax\[parquet\]"'):
    embed_tool.check_output('out.parquet')
  assert embed_tool.check_output('out.npz') == '.npz'


def test_clis(run_dir, embedder_dir, sr, tmp_path):
  """Both programs end to end (flags, loading, progress on stderr), run side by side."""
  probes = tmp_path / 'probes'
  write_probe_folder(probes)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  rel = lambda p: os.path.relpath(p, tmp_path)  # relative paths, as README writes them
  commands = {
      'super_resolve': [sys.executable, '-m', 'ipsr_jax.tools.super_resolve',
                        f'--workdir={rel(run_dir)}', '--input=probes', '--output=sr'],
      'embed': [sys.executable, '-m', 'ipsr_jax.tools.embed', f'--weights={rel(embedder_dir)}',
                f'--sr={rel(run_dir)}', '--mode=sr', '--input=probes', '--output=emb.parquet',
                '--batch_size=4'],
  }
  procs = {k: subprocess.Popen(c, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, c in commands.items()}
  results = {k: (p.communicate(timeout=600), p.returncode) for k, p in procs.items()}
  for name, ((stdout, stderr), code) in results.items():
    assert code == 0, f'{name}: {stderr[-3000:]}'
    assert 'b/bad.jpg' in stderr and '1 unreadable file(s) skipped' in stderr
  assert 'super-resolved 7/8 images to 32x32' in results['super_resolve'][0][0]
  assert 'embedded 7/8 images (dimension 64)' in results['embed'][0][0]
  np.testing.assert_array_equal(image_io.decode_image(tmp_path / 'sr' / 'a' / '2.png'),
                                sr(image_io.resize_to(image_io.decode_image(probes / 'a/2.jpg'),
                                                      32)))
  names, vectors, metadata = embed_tool.read_embeddings(str(tmp_path / 'emb.parquet'))
  assert len(names) == 7 and metadata['input_size'] == EMBEDDER_INPUT  # the run's config
  assert metadata['sr']['step'] == 2 and metadata['mode'] == 'sr'
  pipe = api.Pipeline(sr, api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT))
  want = pipe(np.stack([image_io.resize_to(image_io.decode_image(probes / n), 32) for n in names]))
  np.testing.assert_allclose(vectors, want, atol=2e-5)


def test_fingerprint_follows_the_weights_and_sizes(run_dir, sr, embedder, embedder_dir):
  again = api.SuperResolver.from_checkpoint(run_dir)
  assert again.fingerprint == sr.fingerprint and len(sr.fingerprint) == 16
  nudged = jax.tree_util.tree_map(lambda x: x, jax.device_get(sr.variables))
  leaf = nudged['params'][sorted(nudged['params'])[0]]
  first = sorted(leaf)[0]
  leaf[first] = np.asarray(leaf[first]) + 1e-6
  changed = api.SuperResolver(sr.generator, nudged, image_size=sr.image_size)
  assert changed.fingerprint != sr.fingerprint
  other_size = api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT + 16)
  assert other_size.fingerprint != embedder.fingerprint
  assert api.Embedder.from_checkpoint(embedder_dir, input_size=EMBEDDER_INPUT).fingerprint == embedder.fingerprint
