"""Every experiment config resolves, serialises, and builds its model (shapes only)."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from misc_jax import train

CONFIGS = ['synthetic', 'synthetic:long', 'synthetic:pretrain', 'synthetic:scratch', 'kbcnet_spair', 'kbcnet_pfpascal', 'kbcnet_pfwillow', 'misc210k_dualpath',
           'kbcnet_dinov2_spair', 'dinov2_zero_shot:spair71k', 'misc210k_dualpath:dinov2']


def _load(spec: str):
  name, _, arg = spec.partition(':')
  return importlib.import_module(f'configs.{name}').get_config(arg or None)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
  config = _load(name)
  assert config.to_json_best_effort()
  _, model = train.create_model(config)
  size = config.input.image_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  grid = -(-size // config.model.feature_stride)
  out = jax.eval_shape(model.apply, variables, image, image)
  scores = out['scores'] if isinstance(out, dict) else out  # the dual-path model returns masks too
  assert scores.shape == (1, grid**2, grid, grid)
  assert config.eval.threshold in ('bbox', 'image')


@pytest.mark.parametrize('name', sorted({c.split(':')[0] for c in CONFIGS}))
def test_config_docstring_opens_with_its_command(name):
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert f'--config configs/{name}.py' in doc
