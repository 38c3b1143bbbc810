"""What each accelerator generation can do, from the vendors' public data sheets.

One table for everything that compares a step with its chip: the train-step benchmark's MFU
(`benchmarks/train_step.py`) and the ahead-of-time compiler's fit check and roofline estimate
(`ipsr_jax.training.aot`). Figures are per chip, dense (no sparsity). On GPUs JAX's default float32 matmul
precision runs convolutions and matmuls as TF32, so float32 is held to the TF32 peak; TPUs run
float32 matmuls as bf16 passes at DEFAULT precision, so both dtypes share the bf16 peak.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str                     # the generation, as topologies name it (v5e, h100, ...)
  device_kind: str              # substring of jax's `device.device_kind`
  peak_flops: dict[str, float]  # compute dtype -> dense FLOP/s
  hbm_bytes: int                # memory per chip (TPU: per chip; GPU: per device)
  hbm_bandwidth: float          # bytes/s


# First match on device_kind wins: specific names before generic ones ('TPU v5' is v5p, after
# 'TPU v5 lite'; 'H100' after 'H100 PCIe').
CHIPS: tuple[Chip, ...] = (
    Chip('h100-pcie', 'H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}, 80 * 10**9, 2.0e12),
    Chip('h100', 'H100', {'bfloat16': 989e12, 'float32': 494e12}, 80 * 10**9, 3.35e12),   # SXM, HBM3
    Chip('h200', 'H200', {'bfloat16': 989e12, 'float32': 494e12}, 141 * 10**9, 4.8e12),  # H100's SM, more HBM
    Chip('a100', 'A100', {'bfloat16': 312e12, 'float32': 156e12}, 80 * 10**9, 2.039e12),  # 80 GB SXM
    Chip('l4', 'L4', {'bfloat16': 121e12, 'float32': 60e12}, 24 * 10**9, 0.3e12),
    Chip('v4', 'TPU v4', {'bfloat16': 275e12, 'float32': 275e12}, 32 * GiB, 1.2e12),
    Chip('v5e', 'TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}, 16 * GiB, 0.819e12),
    Chip('v5e', 'TPU v5e', {'bfloat16': 197e12, 'float32': 197e12}, 16 * GiB, 0.819e12),
    Chip('v5p', 'TPU v5', {'bfloat16': 459e12, 'float32': 459e12}, 95 * GiB, 2.765e12),
    Chip('v6e', 'TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}, 32 * GiB, 1.64e12),  # Trillium
    Chip('v6e', 'TPU v6e', {'bfloat16': 918e12, 'float32': 918e12}, 32 * GiB, 1.64e12),
)


def for_device_kind(device_kind: str) -> Chip | None:
  """The chip whose `device_kind` names it, or None (CPUs, unknown chips)."""
  for chip in CHIPS:
    if chip.device_kind.lower() in device_kind.lower():
      return chip
  return None


def by_name(name: str) -> Chip:
  for chip in CHIPS:
    if chip.name == name:
      return chip
  raise KeyError(f'unknown chip {name!r}; known: {sorted({c.name for c in CHIPS})}')
