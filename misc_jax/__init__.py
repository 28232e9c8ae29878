"""misc_jax: multi-instance and small-object semantic correspondence in JAX/Flax."""
