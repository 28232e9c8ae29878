r"""The main job: python -m misc_jax.main --config configs/synthetic.py --workdir runs/demo

Checks the config against what the workdir already holds, builds the configured dataset if it is missing,
writes the resolved config to `workdir/config.json`, a preview of the training data to
`workdir/data_preview.png`, then trains and evaluates (misc_jax/train.py). Override any field:
`--config.optim.lr=1e-4`. One run at a time per workdir (a second one is refused); running the same
command again resumes.

A resume may change how long the run is, its cadences, mesh and evaluation (RESUMABLE_FIELDS); other
changed fields are refused unless --allow_config_changes. config.json keeps the config the run began
with; each resume that changes fields appends a line to config_history.jsonl.

Several processes (one per host, or per GPU): `--multihost` lets `jax.distributed.initialize()` read the
cluster from the environment (Cloud TPU, SLURM, ...); `--coordinator_address`, `--num_processes` and
`--process_id` set it explicitly (e.g. two processes on one machine, over loopback).
"""

import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import tensorflow as tf

from misc_jax import cli
from misc_jax import input_pipeline
from misc_jax import rundir
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax import visualize
from tfds_builders import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = cli.DEFINE_path('workdir', None, 'Where config, logs, checkpoints and plots go.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Initialise jax.distributed from the environment.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
_ALLOW_CHANGES = flags.DEFINE_bool(
    'allow_config_changes', False, 'Resume even though fields that change what the run learns (the model, '
    'loss, optimiser, data) differ from the run\'s config; the changes are recorded in config_history.jsonl.')
flags.mark_flags_as_required(['config', 'workdir'])

# The config fields a resume may change without --allow_config_changes: the run's length, cadences,
# layout over the devices, input speed, evaluation and where the data lies; none changes what a step learns.
RESUMABLE_FIELDS = ('total_steps', 'num_epochs', 'log_every_steps', 'eval_every_steps',
                    'checkpoint_every_steps', 'keep_checkpoints', 'resume_step', 'steps_per_dispatch',
                    'unroll_dispatch', 'mesh.', 'dataset.data_dir', 'dataset.eval_split', 'input.prefetch',
                    'input.decoding_threads', 'model.decoder_chunk_rows', 'model.remat', 'eval.',
                    'kbc.eval', 'kbc.coarse_pass', 'kbc.coarse_radius', 'kbc.passes')


class ResumeError(ValueError):
  """A config that cannot resume the run in its workdir; nothing was written to the run."""


def _quiet_orbax(record) -> bool:
  """Orbax logs several INFO lines per checkpoint, a warning for each step saved without evaluation
  metrics (which we do on purpose), and each of its failed writes as a traceback (a full disk gave
  hundreds, around the one error the run reports): keep its other warnings, drop the rest."""
  if '/orbax/' in record.pathname:
    return (record.levelno >= std_logging.WARNING and not record.exc_info
            and 'did not provide metrics' not in str(record.msg))
  if record.name == 'asyncio':  # Orbax's event loops, torn down after a failed save
    return 'orbax' not in str(record.msg) + str(record.exc_info)
  return True


def _quiet_closed_loops() -> None:
  """Orbax's background threads may still touch their closed event loops while a failed run exits;
  Python prints each "Event loop is closed" as a traceback. Those, and only those, are dropped."""
  closed = lambda value: isinstance(value, RuntimeError) and 'Event loop is closed' in str(value)
  excepthook, unraisablehook, threadhook = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = lambda kind, value, tb: None if closed(value) else excepthook(kind, value, tb)
  sys.unraisablehook = lambda u: None if closed(u.exc_value) else unraisablehook(u)
  threading.excepthook = lambda a: None if closed(a.exc_value) else threadhook(a)


def unknown_override(config: ml_collections.ConfigDict, argv) -> str | None:
  """The message for the first `--config.a.b=...` of argv that names no field of `config`, or None."""
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=')[0].split('.')
    node = config
    for depth, part in enumerate(path):
      fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if part not in fields:
        where = 'config' + ''.join(f'.{p}' for p in path[:depth])
        close = difflib.get_close_matches(part, fields, n=3)
        hint = f'; did you mean {" or ".join(close)}?' if close else ''
        return (f'{arg.split("=")[0]}: {where} has no field {part!r}{hint} Its fields: '
                f'{", ".join(sorted(fields)) if fields else "(none: it is a value)"}')
      node = node[part]
  return None


def _config_file(argv) -> str | None:
  """The value of --config (`--config=FILE[:ARG]` or `--config FILE[:ARG]`) in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl's flag parsing, with a readable error for an override of a field the config does not have."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (config_flags raises bare AttributeErrors)
    message = None
    config_file = _config_file(argv)
    if config_file:
      try:
        path, _, arg = config_file.partition(':')
        spec = importlib.util.spec_from_file_location('_config_file', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        message = unknown_override(module.get_config(*([arg] if arg else [])), argv)
      except Exception:  # pylint: disable=broad-except  (the config itself is bad: absl's message says so)
        pass
    sys.exit(f'FATAL Flags parsing error: {message or e}\nPass --helpfull to see help on flags.')


def init_distributed() -> None:
  if _COORDINATOR.value:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # only used on CPU
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def check_resumable(config: ml_collections.ConfigDict, run_dir) -> None:
  """Refuses a config whose model does not fit the checkpoints already in `run_dir`, naming the config
  fields that changed since the run began, before anything is written there. Every process runs it (it
  only reads), so all of them refuse, or none."""
  directory = rundir.absolute(run_dir) / 'checkpoints'
  if not directory.exists():
    return
  with rundir.manager(directory) as mgr:
    step = mgr.latest_step()
    saved = rundir.saved_shapes(mgr, step) if step is not None else None
  if saved is None:
    return  # nothing saved, or the newest step is damaged: the resume falls back past it
  diff = rundir.differences(rundir.shapes(state_lib.state_shapes(config)), saved)
  if not diff:
    return
  changed = {}
  with contextlib.suppress(FileNotFoundError):
    changed = rundir.config_differences(rundir.read_config(run_dir), config)
  raise ResumeError(
      f'{run_dir} holds checkpoints (step {step}) of a model that this config does not describe; nothing '
      'was written. Config fields changed since the run began: '
      f'{rundir.describe(changed) or "(no config.json)"}. '
      f'First arrays that differ: {"; ".join(diff)}. Resume with the run\'s own settings, or use another '
      '--workdir.')


def resumed_step(run_dir) -> int | None:
  """The newest finalized checkpoint step of a run (None for a new run). Read from the directory, not
  through a CheckpointManager, whose creation is a sync point of all processes: any process may ask."""
  return rundir.newest_step(rundir.absolute(run_dir) / 'checkpoints')


def config_changes(config: ml_collections.ConfigDict, run_dir, allow: bool) -> dict:
  """The fields a resumed run changes ({field: (old, new)}, none for a new run); those outside
  RESUMABLE_FIELDS are refused unless `allow`, naming them and the flag that allows them."""
  if resumed_step(run_dir) is None:
    return {}
  try:
    changes = rundir.config_differences(rundir.read_config(run_dir), config)
  except FileNotFoundError:
    return {}
  refused = {f: v for f, v in changes.items() if not f.startswith(RESUMABLE_FIELDS)}
  if refused and not allow:
    raise ResumeError(
        f'{run_dir} is a run that trained with other settings; nothing was written. Changed since: '
        f'{rundir.describe(refused)}. A resume may change only the run\'s length, cadences, mesh, evaluation '
        'and data location; resume with the run\'s own settings, use another --workdir, or pass '
        '--allow_config_changes (the changes are then recorded in config_history.jsonl).')
  return changes


def preview_data(config, run_dir: str) -> None:
  """Draws the first training batch (the dataset is built)."""
  batch = next(input_pipeline.train_iterator(config))
  builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
  path = os.path.join(run_dir, 'data_preview.png')
  visualize.save_pairs(batch, path, category_names=builder.info.features['category'].names)
  logging.info('Wrote %s', path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; the accelerators belong to JAX.
  logging.get_absl_handler().addFilter(_quiet_orbax)
  _quiet_closed_loops()
  init_distributed()
  config, run_dir = _CONFIG.value, _WORKDIR.value
  rundir.expand_paths(config)
  train.check_config(config)
  lead = jax.process_index() == 0
  try:
    with rundir.lock(run_dir) if lead else contextlib.nullcontext():
      check_resumable(config, run_dir)
      if lead:
        builder = build.build(config.dataset.name, config.dataset.data_dir)
        for split, info in builder.info.splits.items():
          logging.info('%s %s: %d pairs', builder.info.full_name, split, info.num_examples)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('dataset built')
      config = train.resolve_schedule(config, build.get_builder(config.dataset.name, config.dataset.data_dir))
      changes = config_changes(config, run_dir, _ALLOW_CHANGES.value)
      if config.get('resume_step') is not None and 'resume_step' not in changes:
        with config.unlocked():  # this resume_step was applied by an earlier resume: resume as usual
          config.resume_step = None
      if jax.process_count() > 1:  # every process has read the run's config before the lead adds to it
        multihost_utils.sync_global_devices('config checked')
      if lead:
        rundir.write_config(config, run_dir, resumed_step(run_dir), changes)
        preview_data(config, run_dir)
      train.train_and_evaluate(config, run_dir)
  except ResumeError as e:
    sys.exit(f'FATAL {e}')
  except rundir.DiskFullError as e:
    sys.exit(f'FATAL {e.strerror}')
  except KeyboardInterrupt:
    step = resumed_step(run_dir)
    sys.exit(f'Stopped at once (a second Ctrl-C); the newest checkpoint in {run_dir} is '
             f'{f"step {step}" if step is not None else "none"}.')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
