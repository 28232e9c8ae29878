"""Models; `config.model.name` selects `misc_jax/models/<name>.py`."""
