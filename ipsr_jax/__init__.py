"""ipsr_jax: identity-preserving face super-resolution for low-resolution face recognition.

Importing the package changes nothing: the entry points (`ipsr_jax.main`, the tools, the `api`
loaders) set the CPU device count (`runtime.cpu_devices`) before JAX starts.
"""

__version__ = "0.1.0"
