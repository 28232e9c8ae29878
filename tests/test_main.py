"""The README's main command, on the smoke config."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_builds_data_and_writes_config_and_preview(tiny_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:smoke',
       '--workdir', str(workdir), f'--config.dataset.data_dir={tiny_data_dir}',
       '--config.seed=3'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.loads((workdir / 'config.json').read_text())
  assert config['seed'] == 3 and config['dataset']['name'] == 'synthetic_misc/tiny'
  assert (workdir / 'data_preview.png').stat().st_size > 10_000
  assert 'Training is not implemented yet' in result.stderr


def test_main_rejects_an_unknown_config_argument(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:huge',
       '--workdir', str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode != 0 and "unknown config argument 'huge'" in result.stderr
