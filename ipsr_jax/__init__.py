"""ipsr_jax: identity-preserving face super-resolution for low-resolution face recognition."""

__version__ = "0.1.0"
