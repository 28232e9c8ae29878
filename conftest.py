"""Test set-up shared by tests/ and tfds_builders/: 8 fake CPU devices, quiet TF, a tiny dataset."""

import os
import tempfile

# Before jax or tensorflow are imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ['CUDA_VISIBLE_DEVICES'] = ''
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One XLA compilation cache for the session and the processes its tests start: a program that several
# tests compile (the smoke train step, in this process and in subprocesses) compiles once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='misc_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  """A TFDS data dir holding synthetic_misc/tiny, built once per test session."""
  from tfds_builders import build  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  build.build('synthetic_misc/tiny', data_dir)
  return data_dir


@pytest.fixture
def smoke_config(tiny_data_dir):
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  config.dataset.data_dir = tiny_data_dir
  return config


# The smoke run that test_train.py compares against and test_predict_evaluate.py loads.
SMOKE_STEPS = 6
SMOKE_OVERRIDES = {'total_steps': SMOKE_STEPS, 'log_every_steps': 1, 'checkpoint_every_steps': 1,
                   'eval_every_steps': SMOKE_STEPS, 'input.data_shards': 2}


def configure(config, **overrides):
  """Sets dotted config fields: SMOKE_OVERRIDES, then `overrides`."""
  with config.unlocked():
    config.update_from_flattened_dict({**SMOKE_OVERRIDES, **overrides})
  return config


@pytest.fixture(scope='session')
def trained_run(tiny_data_dir, tmp_path_factory):
  """An uninterrupted 6-step smoke run in this process (8 devices), with the config.json that
  misc_jax.main writes: (workdir, final metrics)."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  from misc_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('trained_run')
  config = configure(synthetic.get_config('smoke'), **{'dataset.data_dir': tiny_data_dir})
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return workdir, train.train_and_evaluate(config, str(workdir))
