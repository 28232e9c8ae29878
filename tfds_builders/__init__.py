"""TFDS builders of misc_jax; importing a subpackage registers its builder with TFDS."""
