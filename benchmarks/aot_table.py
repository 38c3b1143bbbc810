"""The paper's training step compiled for several TPU / GPU topologies: one table, one JSON.

Each row runs `python -m ipsr_jax.tools.aot_compile` in its own process (libtpu loads once per
process) on `configs/base.py` (UNet ngf 64 at 128, FaceNet at 160, Adam, degradation on device)
and reads its aot.json. Figures are per device; the step time is the roofline estimate of
`ipsr_jax.training.aot.roofline`, not a measurement.

    python benchmarks/aot_table.py --out=/tmp/aot_table          # every row below
    python benchmarks/aot_table.py --rows=v5e-8,h100-8 --out=/tmp/aot_table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import timing  # pylint: disable=wrong-import-position

# name -> (topology, per-chip batch, extra config flags)
ROWS = {
    'v5e-8': ('v5e-8', 8, ()),
    'v5e-8-b64': ('v5e-8', 64, ()),
    'v5e-8-fsdp': ('v5e-8', 8, ('--config.mesh.fsdp=8',)),
    'v5e-256-bf16': ('v5e-256', 64, ('--config.train.compute_dtype=bfloat16',)),
    'v4-32': ('v4-32', 8, ()),
    'h100-8': ('h100-8', 8, ()),
    'h100-8-bf16-fsdp': ('h100-8', 8, ('--config.train.compute_dtype=bfloat16', '--config.mesh.fsdp=8')),
}


def run_row(name: str, out: Path) -> dict:
  topology, per_chip, extra = ROWS[name]
  row_dir = out / name
  cmd = [sys.executable, '-m', 'ipsr_jax.tools.aot_compile', '--config=configs/base.py', f'--topology={topology}',
         f'--per_chip_batch={per_chip}', f'--out={row_dir}', '--config.embedder.checkpoint=', *extra]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  report = json.loads((row_dir / 'aot.json').read_text()) if (row_dir / 'aot.json').exists() else {}
  report.update(row=name, command=' '.join(cmd[1:]), returncode=proc.returncode)
  if proc.returncode:
    report['stderr_tail'] = proc.stderr[-1500:]
  return report


def table(reports: list[dict]) -> str:
  lines = ['| row | devices | batch/device | dtype | peak memory / HBM | GFLOP/step | all-gather | reduce-scatter '
           '| all-reduce | est. img/s/chip | est. h, paper budget | compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in reports:
    if r.get('returncode'):
      lines.append(f"| {r['row']} | failed: {r.get('error', r.get('stderr_tail', ''))[:120]} |")
      continue
    coll = lambda kind: ', '.join(f"{c['count']} {c['dtype']} {c['bytes'] / 2**20:,.1f} MiB"
                                  for c in r['collectives'] if c['kind'] == kind) or '-'
    roof = r['roofline']
    lines.append(
        f"| {r['row']} | {r['devices']} | {r['per_chip_batch']} | {r['compute_dtype']} | "
        f"{r['memory']['peak'] / 1e9:.2f} / {r['hbm_bytes'] / 1e9:.1f} GB | {r['flops_per_step'] / 1e9:,.0f} | "
        f"{coll('all-gather')} | {coll('reduce-scatter')} | {coll('all-reduce')} | "
        f"{roof['images_per_second_per_chip']:,.0f} ({roof['bound']}) | {roof['paper_budget_hours']:,.1f} | "
        f"{r['compile_seconds']:.0f} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', default=','.join(ROWS), help=f'comma-separated, of: {", ".join(ROWS)}')
  parser.add_argument('--out', required=True, help='folder for each row\'s aot.json / hlo.txt and table.json')
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports = []
  for name in args.rows.split(','):
    reports.append(run_row(name, out))
    print(table(reports[-1:]).splitlines()[-1], flush=True)
  print(table(reports))
  timing.save(dict(command=timing.command(None), machine=timing.machine(), rows=reports), os.path.join(out, 'table.json'))


if __name__ == '__main__':
  main()
