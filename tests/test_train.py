"""The training system on the smoke config: files a run writes, exact resume after SIGKILL, SIGTERM,
non-finite losses, and the same losses on 1 device and 8 devices (several processes: test_multihost.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import PIL.Image
import orbax.checkpoint as ocp
import pytest

from misc_jax import state as state_lib
from misc_jax import rundir
from misc_jax import train
from misc_jax import visualize

from conftest import configure as _configure
from conftest import SMOKE_OVERRIDES as OVERRIDES
from conftest import SMOKE_STEPS as STEPS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, data_dir, *flags, devices=8, log_name=None, **overrides):
  """Starts `python -m misc_jax.main` on the smoke config; returns the Popen (output in
  `log_name or workdir`.log)."""
  args = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **overrides}.items()]
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  log = open(os.path.join(REPO, f'{log_name or workdir}.log'), 'w')  # pylint: disable=consider-using-with
  return subprocess.Popen(
      [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:smoke',
       '--workdir', str(workdir), f'--config.dataset.data_dir={data_dir}', *args, *flags],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, log_name, timeout=600):
  assert proc.wait(timeout) == 0, open(f'{log_name}.log').read()[-4000:]


def _losses(workdir):
  return np.array([v for _, v in visualize.read_scalars(str(workdir))['train/loss']])


def _params(workdir, step=STEPS):
  with ocp.CheckpointManager(workdir / 'checkpoints') as mgr:
    return mgr.restore(step)['params']


@pytest.fixture
def reference(trained_run):
  """The uninterrupted 6-step run (conftest.py), the baseline of the other tests."""
  return trained_run


def test_run_writes_checkpoints_metrics_and_plots(reference):
  workdir, metrics = reference
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [4, 5, 6]  # keep 3
  with rundir.manager(workdir / 'checkpoints', best_metric='pck@0.1') as mgr:
    assert mgr.best_step() == 6  # the one evaluated step, its metric in the step's metadata
    assert mgr.metadata(6).metrics == {'pck@0.1': metrics['pck@0.1']}
  assert (workdir / 'eval' / 'validation_00000006.json').exists()
  assert 0 <= metrics['pck@0.05'] <= metrics['pck@0.1'] <= metrics['pck@0.15'] <= 1
  assert metrics['num_pairs'] == 3
  losses = _losses(workdir)
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  for png in ('predictions.png', 'learning_curve.png'):
    assert (workdir / png).stat().st_size > 10_000
  # TensorBoard holds the predictions figure of the evaluation (and the curves as scalars).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0}).Reload()
  assert {'predictions', 'train/loss', 'eval/pck@0.1'} <= set(events.Tags()['tensors'])
  (image,) = events.Tensors('predictions')
  width, height, png = image.tensor_proto.string_val
  assert image.step == STEPS and png.startswith(b'\x89PNG')
  assert (int(width), int(height)) == PIL.Image.open(workdir / 'predictions.png').size


def test_resume_after_sigkill_ends_with_the_same_parameters(reference, tiny_data_dir, tmp_path):
  workdir = tmp_path / 'killed'
  proc = _main(workdir, tiny_data_dir)
  while not (workdir / 'checkpoints' / '3').exists():
    assert proc.poll() is None, open(f'{workdir}.log').read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  _finish(_main(workdir, tiny_data_dir), workdir)  # resumes from the latest complete checkpoint
  config = json.loads((workdir / 'config.json').read_text())
  assert config['total_steps'] == STEPS and config['dataset']['name'] == 'synthetic_misc/tiny'
  assert (workdir / 'data_preview.png').stat().st_size > 10_000
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               _params(workdir), _params(reference[0]))
  np.testing.assert_allclose(_losses(workdir), _losses(reference[0]), rtol=1e-6)
  assert _logged_steps(workdir) == list(range(1, STEPS + 1))  # each step once, though steps were redone


def _logged_steps(workdir):
  """The steps of every train/loss event in the run's TensorBoard files, as written (read_scalars keeps
  the last value of a step, TensorBoard may show both)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  steps = []
  for path in workdir.glob('events.out.tfevents.*'):
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      steps += [event.step for v in event.summary.value if v.tag == 'train/loss']
  return sorted(steps)


def test_one_device_gives_the_same_losses_as_eight(reference, tiny_data_dir, tmp_path):
  workdir = tmp_path / 'one_device'
  relative = os.path.relpath(workdir, REPO)  # as the README's command gives it
  _finish(_main(relative, tiny_data_dir, devices=1), workdir)
  # 8 pairs on one device vs 1 per device changes XLA's convolution reduction order; Adam amplifies that
  # float noise step by step (measured: 2e-5 at step 3, 1.1e-2 at step 6). A wrong data split changes the
  # first loss, a missing gradient pmean the second, by far more than 1e-4.
  ours, theirs = _losses(workdir), _losses(reference[0])
  np.testing.assert_allclose(ours[:3], theirs[:3], rtol=1e-4)
  np.testing.assert_allclose(ours, theirs, rtol=5e-2)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_exits_and_a_second_run_is_refused(tiny_data_dir, tmp_path,
                                                                                  signum):
  workdir = tmp_path / 'preempted'
  proc = _main(workdir, tiny_data_dir, total_steps=10_000, checkpoint_every_steps=10_000,
               eval_every_steps=10_000)
  while 'train/loss' not in open(f'{workdir}.log').read():
    assert proc.poll() is None, open(f'{workdir}.log').read()[-3000:]
    time.sleep(0.2)
  second = _main(workdir, tiny_data_dir, log_name=tmp_path / 'second')  # the same workdir: refused
  assert second.wait(300) != 0
  assert 'is in use by another run (pid' in open(f'{tmp_path / "second"}.log').read()
  proc.send_signal(signum)
  _finish(proc, workdir)
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir()]
  assert len(steps) == 1 and 1 <= steps[0] < 10_000
  log = open(f'{workdir}.log').read()
  assert f'Saved step {steps[0]} after a stop request' in log and 'Traceback' not in log


def test_a_full_disk_while_saving_ends_in_one_line_that_names_the_kept_steps(tiny_data_dir, tmp_path):
  """The run's workdir on a 12 MiB tmpfs (a mount namespace of its own): step 2's checkpoint (7 MB) fits,
  step 4's does not. One FATAL line, no traceback, the unfinished step's folder removed."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mount = f'mount -t tmpfs -o size=12m tmpfs {disk}'
  if subprocess.run(['unshare', '-rm', 'sh', '-c', mount], capture_output=True, check=False).returncode:
    pytest.skip('cannot mount a tmpfs in a user and mount namespace here')
  workdir = disk / 'run'
  args = [f'--config.{k}={v}' for k, v in {**OVERRIDES, 'checkpoint_every_steps': 2}.items()]
  command = [sys.executable, '-m', 'misc_jax.main', '--config', 'configs/synthetic.py:smoke', '--workdir',
             str(workdir), f'--config.dataset.data_dir={tiny_data_dir}', *args]
  script = f'{mount} && {{ "$@"; echo "exit code $?"; ls -a {workdir}/checkpoints; }}'
  result = subprocess.run(['unshare', '-rm', 'sh', '-c', script, 'sh', *command], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
  log, listing = result.stderr, result.stdout.split()
  assert 'exit code 1' in result.stdout, log[-3000:]
  last = log.strip().splitlines()[-1]
  assert last == (f'FATAL disk full while saving checkpoint step 4 in {workdir}/checkpoints (its unfinished '
                   'files are removed); the checkpoint steps kept are [2]. Free space (or set a smaller '
                   'config.keep_checkpoints) and run the same command again to resume.'), log[-3000:]
  assert 'Traceback' not in log and len(log.splitlines()) < 100, log
  assert [name for name in listing if name not in ('.', '..', 'exit', 'code', '1')] == ['2']


def test_a_second_ctrl_c_interrupts_at_once():
  with train._Preemption() as preemption:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested  # the first one asks for a checkpoint and a stop
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reference, smoke_config,
                                                                         tmp_path):
  workdir = tmp_path / 'diverged'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  config = _configure(smoke_config, total_steps=STEPS + 2, **{'model.beta': 0.0})  # scores / 0
  with pytest.raises(FloatingPointError, match=f'non-finite training metrics at step {STEPS + 1}'):
    train.train_and_evaluate(config, str(workdir))
  assert max(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == STEPS


def test_a_diverged_run_names_its_steps_and_resumes_from_the_one_the_user_chooses(reference, smoke_config,
                                                                                  tmp_path):
  """A learning rate of 1e12: step 7 still has finite metrics (they are computed from step 6's parameters)
  and is saved with huge finite parameters; step 8 is not finite. Step 7 is not called good; resuming from
  step 6 by config.resume_step moves step 7 aside and trains on."""
  workdir = tmp_path / 'diverged'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  config = _configure(smoke_config.copy_and_resolve_references(), total_steps=STEPS + 3,
                      **{'optim.lr': 1e12, 'optim.backbone_lr': 1e12})
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(workdir))
  message = str(error.value)
  assert f'non-finite training metrics at step {STEPS + 2}' in message
  norms = {int(s): float(n) for s, n in re.findall(r'(\d+) \(parameter norm ([\d.e+]+)\)', message)}
  assert sorted(norms) == [STEPS - 1, STEPS, STEPS + 1] and norms[STEPS + 1] > 1e6 * norms[STEPS]
  assert f'Steps after {STEPS} may already hold diverged parameters' in message
  assert f'--config.resume_step={STEPS}' in message
  config = _configure(smoke_config, total_steps=STEPS + 2, resume_step=STEPS)
  train.train_and_evaluate(config, str(workdir))
  assert (workdir / 'checkpoints_set_aside' / str(STEPS + 1)).exists()
  assert np.all(np.isfinite(_losses(workdir)[-2:]))
  with pytest.raises(FileNotFoundError, match=r'resume_step=3: there is no checkpoint step 3 .* its steps are '
                                              rf'\[{STEPS}, {STEPS + 1}, {STEPS + 2}\]'):
    train.train_and_evaluate(_configure(smoke_config, total_steps=STEPS + 2, resume_step=3), str(workdir))


def test_evaluation_only_run_from_another_workdir_reproduces_its_pck(reference, smoke_config,
                                                                    tmp_path):
  """total_steps=0 with init_from (how configs/kbcnet_pfwillow.py evaluates a PF-PASCAL model)."""
  relative = os.path.relpath(reference[0])  # as a user types it
  config = _configure(smoke_config, total_steps=0, **{'model.init_from': relative})
  metrics = train.train_and_evaluate(config, str(tmp_path / 'eval_only'))
  assert metrics['pck@0.1'] == pytest.approx(reference[1]['pck@0.1'], abs=1e-6)
  assert metrics['num_pairs'] == reference[1]['num_pairs']


def test_a_resume_with_another_model_is_refused_and_keeps_the_run_config(reference, tiny_data_dir,
                                                                           tmp_path):
  workdir = tmp_path / 'changed'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(reference[0] / 'config.json', workdir / 'config.json')
  before = (workdir / 'config.json').read_text()
  proc = _main(workdir, tiny_data_dir, **{'model.csfa_dim': 48})
  assert proc.wait(300) != 0
  log = open(f'{workdir}.log').read()
  assert 'holds checkpoints (step 6) of a model that this config does not describe' in log, log[-3000:]
  assert 'model.csfa_dim: 32 -> 48' in log
  assert 'params/csfa/Dense_0/bias: model (96,), checkpoint (64,)' in log
  assert (workdir / 'config.json').read_text() == before  # the run's own config is untouched


def test_a_resume_that_changes_what_the_run_learns_is_refused_unless_allowed_and_recorded(
    reference, tiny_data_dir, tmp_path):
  """Fields that keep the arrays' shapes (the loss's sigma) but change what a step learns are refused;
  --allow_config_changes resumes, config.json stays the run's first config, and config_history.jsonl
  records the change beside the run's length, which may change freely."""
  workdir = tmp_path / 'changed'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(reference[0] / 'config.json', workdir / 'config.json')
  before = (workdir / 'config.json').read_text()
  sigma = json.loads(before)['model']['sigma']
  proc = _main(workdir, tiny_data_dir, **{'model.sigma': 2 * sigma})
  assert proc.wait(300) != 0
  log = open(f'{workdir}.log').read()
  assert f'Changed since: model.sigma: {sigma!r} -> {2 * sigma!r}. A resume may change only' in log, log[-3000:]
  assert '--allow_config_changes' in log and 'Traceback' not in log
  assert not (workdir / rundir.HISTORY).exists()
  _finish(_main(workdir, tiny_data_dir, '--allow_config_changes', total_steps=STEPS + 1,
                **{'model.sigma': 2 * sigma}), workdir)
  assert (workdir / 'config.json').read_text() == before
  [entry] = [json.loads(line) for line in (workdir / rundir.HISTORY).read_text().splitlines()]
  assert entry['newest_checkpoint_step'] == STEPS
  assert entry['changes'] == {'model.sigma': [sigma, 2 * sigma], 'total_steps': [STEPS, STEPS + 1]}
  assert rundir.read_config(workdir).model.sigma == 2 * sigma  # what evaluate and predict read
  assert (workdir / 'checkpoints' / str(STEPS + 1)).exists()


def _damage(checkpoints, how):
  """Damages checkpoint step 6 three ways: its array files (OCDBT's d/ folders) cut to 100 bytes; 2,000
  bytes flipped in the middle of the largest one (the file keeps its size; zstd usually notices, raw blocks
  would not); or step 5's arrays in step 6's place, which decode cleanly and only the checksums saved
  with step 6 can tell apart."""
  step_dir = checkpoints / '6'
  if how == 'swap':
    shutil.rmtree(step_dir / 'default')
    shutil.copytree(checkpoints / '5' / 'default', step_dir / 'default')
    return
  files = [p for p in step_dir.rglob('*') if p.parent.name == 'd' and p.stat().st_size >= 10_000]
  if how == 'flip':
    files = [max(files, key=lambda p: p.stat().st_size)]
  for path in files:
    with open(path, 'r+b') as f:
      if how == 'truncate':
        f.truncate(100)
      else:
        f.seek(path.stat().st_size // 2)
        data = f.read(2000)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in data))


@pytest.mark.parametrize('how', ['truncate', 'flip', 'swap'])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_that_restores(reference, smoke_config,
                                                                            tmp_path, caplog, how):
  workdir = tmp_path / 'damaged'
  shutil.copytree(reference[0] / 'checkpoints', workdir / 'checkpoints')
  shutil.copy(reference[0] / 'config.json', workdir / 'config.json')
  _damage(workdir / 'checkpoints', how)
  # Evaluation: 'latest' falls back to step 5 and names step 6; step 6 itself is reported as damaged.
  assert state_lib.load_run(str(workdir))[3] == 5
  assert 'checkpoint step 6' in caplog.text and 'is damaged' in caplog.text
  if how == 'swap':
    assert 'differ from their checksums' in caplog.text
  with pytest.raises(rundir.DamagedCheckpointError, match='checkpoint step 6 .* is damaged'):
    state_lib.load_run(str(workdir), '6')
  # Training resumes from step 5, sets step 6 aside and trains it again: the uninterrupted run's result.
  config = _configure(smoke_config, total_steps=STEPS)
  train.train_and_evaluate(config, str(workdir))
  assert (workdir / 'checkpoints_damaged' / '6').exists()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               _params(workdir), _params(reference[0]))


def test_init_from_takes_the_checkpoint_the_config_names(reference, smoke_config):
  """config.model.init_from_checkpoint: 'latest', 'best' or a step of the other run."""
  for choice, step in (('latest', STEPS), ('best', STEPS), ('4', 4)):
    config = _configure(smoke_config, **{'model.init_from': str(reference[0]),
                                         'model.init_from_checkpoint': choice})
    state = state_lib.initial_state(config, state_lib.create_model(config)[1])
    jax.tree.map(np.testing.assert_array_equal, state.params, _params(reference[0], step))
  config = _configure(smoke_config, **{'model.init_from': str(reference[0]),
                                       'model.init_from_checkpoint': 'bset'})
  with pytest.raises(ValueError, match="config.model.init_from: checkpoint 'bset': expected"):
    state_lib.initial_state(config, state_lib.create_model(config)[1])


def test_an_export_records_the_chain_of_runs_it_started_from(reference, tmp_path):
  """A run started from an exported file and from another run (configs/synthetic.py's chain) exports a
  provenance holding both records, its own config as it began (init_from kept) and its commit."""
  from misc_jax.tools import export_trunk  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'trunk.msgpack'
  export_trunk.export(str(reference[0]), str(path))
  config = rundir.read_config(reference[0])
  config.model.trunk_init, config.model.init_from = str(path), str(reference[0])
  child = tmp_path / 'child'
  rundir.write_config(config, child)
  record = export_trunk.run_record(child, step=0)
  assert record['commit'] == rundir.code_commit() != ''
  assert json.loads(record['config'])['model']['init_from'] == str(reference[0])
  from_file, from_run = record['started_from']
  assert from_file == json.loads(state_lib.load_trunk(str(path))['provenance'])
  assert from_run['workdir'] == str(reference[0]) and from_run['step'] == STEPS
  assert from_run['checkpoint'] == config.model.init_from_checkpoint and from_run['started_from'] == []


def test_an_exported_run_starts_the_modules_a_model_takes_and_leaves_the_rest_fresh(reference, smoke_config,
                                                                                  tmp_path):
  """By default a model takes the trunk of an exported run; config.model.trunk_modules names more."""
  from misc_jax.tools import export_trunk  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'trunk.msgpack'
  export_trunk.export(str(reference[0]), str(path))
  provenance = json.loads(state_lib.load_trunk(str(path))['provenance'])
  assert provenance['step'] == STEPS and provenance['wall_time_s'] > 0
  assert json.loads(provenance['config'])['dataset']['name'] == 'synthetic_misc/tiny'
  config = _configure(smoke_config, **{'model.trunk_init': str(path)})
  params = state_lib.initial_state(config, state_lib.create_model(config)[1]).params
  fresh = state_lib.initial_state(smoke_config, state_lib.create_model(smoke_config)[1]).params
  trained = _params(reference[0])
  for module in state_lib.TRUNK:
    jax.tree.map(np.testing.assert_array_equal, params[module], trained[module])
  jax.tree.map(np.testing.assert_array_equal, params['decoder'], fresh['decoder'])
  assert any(not np.array_equal(a, b)  # training moved the decoder, so the check above can fail
             for a, b in zip(jax.tree.leaves(trained['decoder']), jax.tree.leaves(fresh['decoder'])))
  whole = _configure(smoke_config, **{'model.trunk_init': str(path),
                                      'model.trunk_modules': ('backbone', 'csfa', 'decoder')})
  params = state_lib.initial_state(whole, state_lib.create_model(whole)[1]).params
  jax.tree.map(np.testing.assert_array_equal, params['decoder'], trained['decoder'])
  other = _configure(smoke_config, **{'model.trunk_init': str(path), 'model.csfa_dim': 16})
  with pytest.raises(ValueError, match=f'{path}: params of the csfa do not fit the model'):
    state_lib.initial_state(other, state_lib.create_model(other)[1])


def test_several_steps_per_dispatch_give_the_parameters_of_single_steps(reference, smoke_config, tmp_path):
  """Resumed from the reference run's step 4 with two steps per call: steps 5 and 6 in one dispatch end
  where the reference's single steps did (8 devices)."""
  workdir = tmp_path / 'dispatch'
  shutil.copytree(reference[0] / 'checkpoints' / '4', workdir / 'checkpoints' / '4')
  config = _configure(smoke_config, steps_per_dispatch=2, log_every_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(workdir))
  # A scan compiles to other fusions than single steps: float rounding, which Adam amplifies on parameters
  # whose gradients are near zero (measured: median difference 7e-10, largest 2e-4, 0.1% of what the two
  # steps moved the parameters). Feeding a wrong batch or rng would make it ~100%.
  assert _relative_difference(_params(workdir), _params(reference[0]), _params(reference[0], 4)) < 0.01
  with pytest.raises(ValueError, match=r'steps_per_dispatch=4 must divide total_steps \(6\)'):
    train.check_dispatch(_configure(smoke_config, steps_per_dispatch=4, log_every_steps=4,
                                    checkpoint_every_steps=4, eval_every_steps=4), 0)


def _relative_difference(params, reference, start):
  """|params - reference| / |reference - start| (global norms): the disagreement of two ways of taking
  the same steps, relative to how far the steps went."""
  norm = lambda tree: float(optax.tree.norm(tree))
  difference = norm(jax.tree.map(np.subtract, params, reference))
  return difference / norm(jax.tree.map(np.subtract, reference, start))
