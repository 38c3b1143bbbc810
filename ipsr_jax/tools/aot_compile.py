r"""Compile the real training step for a TPU or GPU topology on this machine, and say if it fits.

    python -m ipsr_jax.tools.aot_compile --config=configs/base.py --topology=v5e-8 --out=/tmp/aot
    python -m ipsr_jax.tools.aot_compile --topology=v5e-256 --per_chip_batch=64 \
        --config.train.compute_dtype=bfloat16 --out=/tmp/aot_v5e256
    python -m ipsr_jax.tools.aot_compile --topology=h100-8 --config.mesh.fsdp=8 --out=/tmp/aot_h100

Topologies: v4-N and v5p-N (TensorCores, as Cloud TPU names slices), v5e-N and v6e-N (chips),
h100-N, h200-N, a100-N (GPUs, 8 per host). The step is the one `python -m ipsr_jax.main` runs
with the same config (`train.StepParts`), built from shapes only: no weights, no data, no device.

Prints a summary and writes `<out>/aot.json` (topology, devices, global batch, compute dtype,
compile seconds, per-device memory against the chip's HBM, FLOPs and bytes per step and device,
every collective, `fits`, and a roofline estimate of images/s per chip and hours for the paper's
budget) and `<out>/hlo.txt` (the optimised HLO). Exit 1 with the compiler's message when the step
does not compile or does not fit. The compilers: `pip install ".[aot-tpu]"` / `".[aot-gpu]"`
(ipsr_jax/training/aot.py says how to keep them out of a venv that runs on CPU).
"""

from __future__ import annotations

import json
import os

from ipsr_jax.training import aot  # first: it makes the TPU/GPU compilers findable before JAX starts

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags

from ipsr_jax.runtime import console
from ipsr_jax.runtime import paths
# pylint: enable=g-import-not-at-top,wrong-import-position

REPORT_FILE = 'aot.json'
HLO_FILE = 'hlo.txt'
EXECUTABLE_FILE = 'executable.bin'


def define_flags() -> dict[str, flags.FlagHolder]:
  return dict(
      config=config_flags.DEFINE_config_file('config', 'configs/base.py', 'Training configuration '
                                             '(overrides as --config.a.b=v).', lock_config=True),
      topology=flags.DEFINE_string('topology', None, f'e.g. {", ".join(aot.TOPOLOGY_EXAMPLES)}'),
      per_chip_batch=flags.DEFINE_integer('per_chip_batch', None, 'Set the global batch to this '
                                          'times the device count (default: config.train.batch_size).'),
      out=paths.DEFINE_path('out', None, f'Folder for {REPORT_FILE} and {HLO_FILE} (created).'),
      save_executable=flags.DEFINE_bool('save_executable', False, f'Also write {EXECUTABLE_FILE}: the '
                                        'serialized executable, loadable on the real hardware '
                                        '(jax.experimental.serialize_executable).'),
  )


def summary(report: dict) -> str:
  gb = lambda b: f'{b / 1e9:.2f} GB'
  mem, roof = report['memory'], report['roofline']
  lines = [
      f"{report['topology']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}, "
      f"global batch {report['global_batch']} ({report['per_chip_batch']}/device), {report['compute_dtype']}: "
      f"compiled in {report['compile_seconds']:.0f} s",
      f"memory per device: peak {gb(mem['peak'])} of {gb(report['hbm_bytes'])} HBM "
      f"({'fits' if report['fits'] else 'DOES NOT FIT'}); arguments {gb(mem['arguments'])}, "
      f"temps {gb(mem['temps'])}",
      f"per device and step: {report['flops_per_step'] / 1e9:,.1f} GFLOP, "
      f"{report['bytes_accessed'] / 1e9:,.2f} GB accessed ({report['cost_source']})",
      'collectives: ' + (', '.join(f"{c['count']} {c['kind']} {c['dtype']} ({c['bytes'] / 2**20:,.1f} MiB)"
                                   for c in report['collectives']) or 'none'),
      f"roofline estimate (data-sheet peak and bandwidth, not a measurement): >= "
      f"{roof['step_seconds_bound'] * 1e3:.1f} ms a step ({roof['bound']}-bound), <= "
      f"{roof['images_per_second_per_chip']:,.0f} img/s per chip, >= {roof['paper_budget_hours']:,.1f} h "
      f"for the paper's 2.7 M faces x 50 epochs",
  ]
  return '\n'.join(lines)


def main(argv, holders: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = holders['config'].value
  topo = aot.topology(holders['topology'].value)
  if holders['per_chip_batch'].value is not None:
    with config.unlocked():
      config.train.batch_size = holders['per_chip_batch'].value * len(topo.devices)
  out = holders['out'].value
  console.say(f'Compiling the training step for {topo.name} ({len(topo.devices)} devices)...')
  try:
    report, hlo, compiled = aot.compile_step(config, topo)
  except aot.AotError as e:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, REPORT_FILE), 'w', encoding='utf-8') as f:
      json.dump(dict(topology=topo.name, error=str(e)), f, indent=1)
    raise
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, HLO_FILE), 'w', encoding='utf-8') as f:
    f.write(hlo)
  if holders['save_executable'].value:
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    payload, _, _ = serialize_executable.serialize(compiled)
    with open(os.path.join(out, EXECUTABLE_FILE), 'wb') as f:
      f.write(payload)
    report['executable'] = EXECUTABLE_FILE
  with open(os.path.join(out, REPORT_FILE), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, sort_keys=True)
  console.say(summary(report) + f'\nwrote {os.path.join(out, REPORT_FILE)} and {HLO_FILE}')
  if not report['fits']:
    raise aot.AotError(f"the step needs {report['memory']['peak'] / 1e9:.2f} GB a device, more than the "
                       f"{report['hbm_bytes'] / 1e9:.2f} GB of {topo.chip.name}: lower the per-chip batch, "
                       'use --config.mesh.fsdp or --config.train.compute_dtype=bfloat16')


def run() -> None:
  holders = define_flags()
  flags.mark_flags_as_required(['topology', 'out'])
  console.run_tool(lambda argv: main(argv, holders), 'aot_compile')


if __name__ == '__main__':
  run()
