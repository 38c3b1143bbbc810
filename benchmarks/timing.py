"""What every CPU benchmark here shares: interleaved timed rounds, one row per engine, the machine.

Engines are timed in interleaved rounds (a shared machine's load hits them alike) and each keeps its
best round. A row gives images/s (wall, what a user sees), images per CPU-second (every thread of
the process: the engine's efficiency, which other jobs distort much less) and threads busy.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
import platform
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np


def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def interleaved_rounds(runs: Mapping[str, Callable[[], Any]], rounds: int
                       ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, np.ndarray]]:
  """Wall and CPU seconds of each run per round, and each run's first output (for parity)."""
  seconds: dict[str, list[float]] = {k: [] for k in runs}
  cpu_seconds: dict[str, list[float]] = {k: [] for k in runs}
  outputs: dict[str, np.ndarray] = {}
  for _ in range(max(1, rounds)):
    for name, run in runs.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      out = run()
      seconds[name].append(time.perf_counter() - start)
      cpu_seconds[name].append(time.process_time() - cpu_start)  # every thread of this process
      outputs.setdefault(name, np.asarray(out, np.float32))
  return seconds, cpu_seconds, outputs


def row(images: int, seconds: list[float], cpu_seconds: list[float], setup_s: float) -> dict[str, Any]:
  best, cpu = min(seconds), min(cpu_seconds)
  return dict(images=images, best_s=round(best, 3), seconds=[round(s, 3) for s in seconds],
              img_s=round(images / best, 2), cpu_s=[round(s, 3) for s in cpu_seconds],
              img_per_cpu_s=round(images / cpu, 2), threads_busy=round(cpu / best, 2),
              setup_s=round(setup_s, 2))


def machine() -> dict[str, Any]:
  """When and where: README figures name the machine and its load."""
  import jax  # pylint: disable=g-import-not-at-top
  return dict(date=datetime.datetime.now().isoformat(timespec='seconds'), host=platform.node(),
              cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
              load_average=os.getloadavg(), jax=jax.__version__, backend=jax.default_backend(),
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def print_rows(rows: Mapping[str, Mapping[str, Any]], reference: str) -> None:
  print(f"{'engine':<16}{'images':>7}{'img/s':>9}{'img/cpu-s':>11}{'threads':>9}{'best s':>9}"
        f"{'setup s':>9}{f'|diff| vs {reference}':>18}")
  for name, r in rows.items():
    diff = r.get(f'max_abs_diff_vs_{reference}')
    print(f"{name:<16}{r['images']:>7}{r['img_s']:>9.2f}{r['img_per_cpu_s']:>11.2f}"
          f"{r['threads_busy']:>9.2f}{r['best_s']:>9.3f}{r['setup_s']:>9.2f}"
          f"{'' if diff is None else f'{diff:18.2e}'}")


def command(argv: list[str] | None) -> str:
  """The command line that produced a result (`argv` as given to main, else sys.argv)."""
  return ' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))


def save(result: Mapping[str, Any], out: str | None) -> None:
  if out:
    Path(out).write_text(json.dumps(result, indent=1) + '\n')
