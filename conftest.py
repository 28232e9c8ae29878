"""Test set-up shared by tests/ and tfds_builders/: 8 fake CPU devices, quiet TF, a tiny dataset."""

import os

# Before jax or tensorflow are imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ['CUDA_VISIBLE_DEVICES'] = ''
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

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
