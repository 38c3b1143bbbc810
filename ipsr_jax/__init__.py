"""ipsr_jax: identity-preserving face super-resolution for low-resolution face recognition."""

from ipsr_jax import cpu_devices as _cpu_devices

__version__ = "0.1.0"

# One XLA CPU device per core unless the user chose otherwise; must precede JAX's first computation.
_cpu_devices.configure()
