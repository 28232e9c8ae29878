"""The main job's command line and what it checks before it writes anything (its training runs are in
test_train.py)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:smoke', *args], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False, env=env)


def test_main_rejects_an_unknown_config_argument(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:huge',
       '--workdir', str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode != 0 and "unknown config argument 'huge'" in result.stderr


def test_an_override_of_a_field_that_does_not_exist_names_the_field_and_the_choices(tmp_path):
  result = _main('--workdir', str(tmp_path / 'run'), '--config.model.nonexistant=1')
  assert result.returncode != 0
  assert "--config.model.nonexistant: config.model has no field 'nonexistant'" in result.stderr
  assert 'Its fields: ' in result.stderr and 'backbone_init' in result.stderr
  assert 'Traceback' not in result.stderr
  result = _main('--workdir', str(tmp_path / 'run'), '--config.optim.lr_=1')
  assert "did you mean lr?" in result.stderr
  assert not (tmp_path / 'run').exists()


def test_a_bad_backbone_file_fails_before_the_dataset_is_built(tmp_path):
  """`~` in a path field is expanded; a file that is not a converted backbone is named at once."""
  (tmp_path / 'weights.msgpack').write_text('not msgpack')
  env = dict(os.environ, HOME=str(tmp_path))
  result = _main('--workdir', str(tmp_path / 'run'), f'--config.dataset.data_dir={tmp_path / "tfds"}',
                 '--config.model.backbone_init=~/weights.msgpack', env=env)
  assert result.returncode != 0
  assert f'{tmp_path}/weights.msgpack is not a converted backbone' in result.stderr, result.stderr[-2000:]
  result = _main('--workdir', str(tmp_path / 'run'), f'--config.dataset.data_dir={tmp_path / "tfds"}',
                 '--config.model.backbone_init=$HOME/missing.msgpack', env=env)
  assert f'{tmp_path}/missing.msgpack does not exist' in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'tfds').exists() and not (tmp_path / 'run' / 'config.json').exists()
