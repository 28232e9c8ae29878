"""The main job's command line (its training runs are in test_train.py)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_rejects_an_unknown_config_argument(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:huge',
       '--workdir', str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode != 0 and "unknown config argument 'huge'" in result.stderr
