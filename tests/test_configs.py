"""Every experiment config resolves, serialises, and builds its model (shapes only); the shipped
pretrained weights fit the models that start from them."""

import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from misc_jax import state as state_lib

CONFIGS = ['synthetic', 'synthetic:long', 'synthetic:pretrain', 'synthetic:pretrain_kbc', 'synthetic:scratch',
           'kbcnet_spair', 'kbcnet_spair:hires', 'kbcnet_spair:stride8', 'kbcnet_pfpascal', 'kbcnet_pfwillow',
           'misc210k_dualpath',
           'kbcnet_dinov2_spair', 'dinov2_zero_shot:spair71k', 'dinov2_zero_shot:pf_pascal,ours',
           'misc210k_dualpath:dinov2']


def _load(spec: str):
  name, _, arg = spec.partition(':')
  return importlib.import_module(f'configs.{name}').get_config(arg or None)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
  config = _load(name)
  assert config.to_json_best_effort()
  _, model = state_lib.create_model(config)
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


def test_the_shipped_weights_fit_the_synthetic_models_and_name_their_training():
  for name in ('synthetic', 'misc210k_dualpath:synthetic', 'synthetic:pretrain_kbc'):
    config = _load(name)
    trunk = state_lib.load_trunk(config.model.trunk_init)
    provenance = json.loads(trunk['provenance'])
    pretrain = json.loads(provenance['config'])
    assert pretrain['dataset']['name'] == 'synthetic_misc/large'
    assert provenance['step'] == pretrain['total_steps'] and provenance['wall_time_s'] > 0
    if name.startswith('misc210k'):  # masks of every instance of the whole image: no KBC crops
      assert not config.kbc.train_prob and not config.kbc.eval
    _, model = state_lib.create_model(config)
    image = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.uint8)
    variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
    state_lib.merge(variables, trunk, name, config.model.trunk_modules)  # what loading does; raises on misfits


def test_the_shipped_kbcnet_records_its_chain_of_four_runs():
  """The demo's model: three :pretrain_kbc runs, each from the one before, the first from the :pretrain
  trunk, which trained from scratch on synthetic_misc/large."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  record = json.loads(state_lib.load_trunk(synthetic.PRETRAINED_KBCNET)['provenance'])
  stages = []
  while record:
    stages.append(record)
    assert len(record.get('started_from', [])) <= 1
    record = (record.get('started_from') or [None])[0]
  assert len(stages) == 4
  configs = [json.loads(s['config']) for s in stages]
  assert [c['seed'] for c in configs[:3]] == [2, 1, 0]
  assert [c['model']['init_from'] for c in configs[:2]] == ['runs/pretrain_kbc2', 'runs/pretrain_kbc']
  assert configs[2]['model']['trunk_init'] and not configs[3]['model']['init_from']
  assert all(c['dataset']['name'] == 'synthetic_misc/large' for c in configs)
  assert [s['step'] for s in stages] == [6000, 6000, 6000, 8000] and all(s['wall_time_s'] > 0 for s in stages)


def test_a_config_file_loads_from_any_directory(tmp_path):
  """`--config /path/to/configs/x.py` from another directory: the configs it imports are a package of the
  installed project, not files beside the working directory."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys; from absl import flags; from ml_collections import config_flags; '
          'config = config_flags.DEFINE_config_file("config"); flags.FLAGS(sys.argv); '
          'print(config.value.model.variant)')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  result = subprocess.run([sys.executable, '-c', code, f'--config={repo}/configs/kbcnet_pfwillow.py'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == _load('kbcnet_pfwillow').model.variant


@pytest.mark.parametrize('name', ['kbcnet_spair', 'kbcnet_pfpascal', 'kbcnet_dinov2_spair'])
def test_the_benchmark_recipes_train_through_kbc_crops(name):
  """Our choice on the benchmarks (docs/reproduction.md's KBC row): half the training pairs cropped, and
  the test-time target crop framed by the coarse predictions that agree."""
  config = _load(name)
  assert config.kbc.eval and config.kbc.train_prob == 0.5 and config.kbc.coarse_radius == 0.5


def test_the_dinov2_zero_shot_config_follows_the_dinov2_line_protocol():
  """840 px with the aspect kept, the keypoint's argmax (or GeoAware-SC's window), the test split; our
  earlier baseline is a named variant."""
  protocol, windowed, ours = (_load(f'dinov2_zero_shot:spair71k{v}') for v in ('', ',windowed', ',ours'))
  assert (protocol.input.image_size, protocol.input.keep_aspect, protocol.model.transfer,
          protocol.dataset.eval_split) == (840, True, 'argmax', 'test')
  assert windowed.model.transfer == 'windowed_soft_argmax' and windowed.input.image_size == 840
  assert (ours.input.image_size, ours.input.keep_aspect, ours.model.transfer,
          ours.dataset.eval_split) == (518, False, 'soft_argmax', 'validation')
  with pytest.raises(ValueError, match='VARIANT one of'):
    _load('dinov2_zero_shot:spair71k,geoaware')
