"""Keeps freed host buffers in the process instead of handing them back to the kernel (glibc).

Every batch the pipeline allocates and frees the same large buffers: decoded images, the stacked
batch, the float32 passes of the degradation. glibc serves blocks above its mmap threshold with
fresh mappings and trims free heap tops back to the kernel, so each batch faults its buffers in
again, page by page: 43 faults per 128x128 face on the host path, at 2.4-3.8 us each on the 2-core
VM this was measured on, a quarter of the face's CPU (benchmarks/NOTES.md, "Input pipeline"). Raising both
thresholds keeps those pages: glibc then faults only once, as tcmalloc or jemalloc would.
"""

from __future__ import annotations

import ctypes
import functools
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2), far
# above a batch of 128x128 faces (3 MiB uint8, 12 MiB float32 for 64 faces).
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's top returned to the kernel only beyond this.
TRIM_THRESHOLD = 1 << 30


@functools.cache
def retain_freed_memory() -> bool:
  """Sets glibc's two thresholds for this process (once); False where they cannot be set.

  Process-wide: the pipeline calls it in its own process and in each Grain worker when
  `data.retain_freed_memory` is on. Other C libraries are left as they are.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # musl's mallopt is a stub that returns 0: report it rather than pretend.
  return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
      mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def init_worker(worker_index: int, worker_count: int) -> None:
  """Grain's `worker_init_fn`: the same setting in every worker process."""
  del worker_index, worker_count
  retain_freed_memory()
