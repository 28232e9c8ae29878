"""Experiment configs (`--config configs/synthetic.py:smoke`). A package, installed with misc_jax, so that
a config file's `from configs import common` works from any directory."""
