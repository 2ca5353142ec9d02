"""lvm_jax: JAX/Flax trainer for large autoregressive vision models (LVM and AIM)."""

__version__ = "0.1.0"
