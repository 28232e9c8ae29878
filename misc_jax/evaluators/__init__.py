"""Evaluators by name: config.evals.<key>.type -> misc_jax/evaluators/<type>.py."""
