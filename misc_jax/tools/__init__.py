"""Command-line tools: python -m misc_jax.tools.<name>."""
