"""data.retain_freed_memory: glibc stops faulting the batch buffers in again every batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipsr_jax.data import host_memory

REPO = Path(__file__).resolve().parents[1]

# The pipeline over 128x128 JPEG faces in batches of 64 (the training shape), in one thread or one
# worker, with a given hand-off: minor page faults per face, in steady state, of the process that
# decodes and degrades. A fresh process each, since the setting is global.
PROBE = r'''
import os, sys, tempfile
from pathlib import Path
import numpy as np
import psutil
from PIL import Image
from benchmarks.input_pipeline import minor_faults
from configs import base
from ipsr_jax.data import host_memory, pipeline
from ipsr_jax.data.sources import folders


if __name__ == '__main__':
  retain, workers, handoff = sys.argv[1] == 'on', int(sys.argv[2]), sys.argv[3]
  root = Path(tempfile.mkdtemp())
  rng = np.random.default_rng(0)
  for i in range(256):
    folder = root / f'id{i // 4}'
    folder.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / f'{i}.jpg')
  config = base.get_config()
  config.model.image_size = 128
  config.data.update(image_size=128, read_threads=0, num_workers=workers, degrade_on_device=False,
                     retain_freed_memory=retain, worker_handoff=handoff)
  config.train.batch_size = 64
  it = pipeline.make_train_iterator(config, folders.IdentityFolders(str(root)))
  for _ in range(4 + 3 * workers):
    next(it)
  # The process that decodes and degrades: this one, or the worker (the busiest child).
  pid = os.getpid()
  if workers:
    pid = max(psutil.Process().children(recursive=True), key=lambda p: p.cpu_times().user).pid
  before = minor_faults(pid)
  for _ in range(12):
    next(it)
  print((minor_faults(pid) - before) / (12 * 64), host_memory.retain_freed_memory.cache_info().currsize)
  it.close()
'''


def _faults_per_face(tmp_path: Path, setting: str, workers: int = 0,
                     handoff: str = 'pipe') -> tuple[float, int]:
  script = tmp_path / f'probe_{setting}_{workers}_{handoff}.py'
  script.write_text(PROBE)  # a file, not -c: Grain's workers re-import the main module
  proc = subprocess.run([sys.executable, str(script), setting, str(workers), handoff], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  faults, calls = proc.stdout.split()
  return float(faults), int(calls)


needs_glibc = pytest.mark.skipif(not host_memory.retain_freed_memory(),
                                 reason='glibc mallopt not available')


@needs_glibc
def test_retained_buffers_stop_the_page_faults_of_every_batch(tmp_path):
  # Measured: ~41 faults per face with glibc's defaults, ~0.4 retained (benchmarks/NOTES.md, "Input pipeline").
  off, off_calls = _faults_per_face(tmp_path, 'off')
  on, on_calls = _faults_per_face(tmp_path, 'on')
  assert (off_calls, on_calls) == (0, 1)  # the pipeline sets it only when asked
  assert off > 15 and on < 3, (off, on)


@needs_glibc
def test_workers_retain_them_too(tmp_path):
  # Through shared memory a worker hands each batch over in new pages: 2 x 12 a face (hr, lr),
  # which no malloc setting avoids; everything above that is what retaining saves.
  off, _ = _faults_per_face(tmp_path, 'off', workers=1, handoff='shared_memory')
  on, _ = _faults_per_face(tmp_path, 'on', workers=1, handoff='shared_memory')
  assert 20 < on < 30 and off > on + 10, (off, on)
  # Through the pipe (the default) the pickled batches reuse retained buffers too.
  piped, _ = _faults_per_face(tmp_path, 'on', workers=1, handoff='pipe')
  assert piped < 3, piped
