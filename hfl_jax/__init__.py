"""hfl_jax: HierFedLoRA in JAX/Flax."""
__version__ = "0.1.0"
