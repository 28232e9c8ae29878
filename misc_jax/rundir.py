"""A run's working directory: its config.json, the lock that keeps a second run out, and its Orbax
checkpoints (`checkpoints/`: the latest N steps and the best evaluated one, each step's evaluation metrics
in its metadata; runs from before this layout kept the best step in `checkpoints_best/`).

Restoring checks a checkpoint before it trusts it: array shapes that differ from the model's mean the
checkpoint belongs to another model (`CheckpointMismatchError`); a step whose files cannot be read back
(truncated arrays, missing metadata) is damaged (`DamagedCheckpointError`), and `restore_newest` falls back
past it to the newest step that restores, naming the damaged ones.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time

from absl import logging
from etils import epath
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from misc_jax import sharding
from misc_jax.cli import expand

HISTORY = 'config_history.jsonl'  # a run's later configs, a line per resume that changed one
COMMIT = 'commit.txt'  # the code's git commit when the run began

# Config fields that hold paths: `~` and environment variables in them are expanded.
PATH_FIELDS = ('dataset.data_dir', 'model.backbone_init', 'model.trunk_init', 'model.init_from')


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not fit the model the config describes."""


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step whose files cannot be read back."""


class DiskFullError(OSError):
  """The disk filled while a checkpoint was written."""


# ----------------------------------------------------------------------------------------------------------
# Paths and config.json.
# ----------------------------------------------------------------------------------------------------------

def absolute(path) -> epath.Path:
  """Orbax needs absolute paths; URLs (gs://...) are left alone."""
  path = expand(str(path))
  return epath.Path(path if '://' in path else os.path.abspath(path))


def expand_paths(config: ml_collections.ConfigDict) -> None:
  """Expands `~` and environment variables in every path field of `config` (PATH_FIELDS), in place."""
  for field in PATH_FIELDS:
    parent, _, leaf = field.rpartition('.')
    node = config[parent]
    if leaf in node and node[leaf]:
      node[leaf] = expand(node[leaf])


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config a run trains with now: config.json (written when the run began, never rewritten) with
  the changes of later resumes (the newest line of config_history.jsonl), both written by misc_jax.main."""
  path = absolute(workdir)
  if not (path / 'config.json').exists():
    raise FileNotFoundError(f'{path / "config.json"} does not exist: {workdir} is not a misc_jax workdir')
  if (path / HISTORY).exists():
    lines = (path / HISTORY).read_text().splitlines()
    if lines:
      return ml_collections.ConfigDict(json.loads(lines[-1])['config'])
  return ml_collections.ConfigDict(json.loads((path / 'config.json').read_text()))


def write_config(config: ml_collections.ConfigDict, workdir, newest_checkpoint: int | None = None,
                 changes: dict | None = None) -> None:
  """A new run's config.json; on a resume that changes fields, a line of config_history.jsonl (the newest
  checkpoint step then, the time, the changes and the whole new config), so the run keeps a record of what
  trained each step. The resume starts from that step unless it is damaged or config.resume_step names an
  earlier one (the log says which); steps after the resumed one are trained again with the new config."""
  path = absolute(workdir)
  path.mkdir(parents=True, exist_ok=True)
  if not (path / 'config.json').exists():
    (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
    (path / COMMIT).write_text(code_commit() + '\n')
  elif changes:
    entry = {'newest_checkpoint_step': newest_checkpoint, 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
             'changes': {field: list(values) for field, values in changes.items()},
             'config': json.loads(config.to_json_best_effort())}
    with (path / HISTORY).open('a') as f:
      f.write(json.dumps(entry) + '\n')


def code_commit() -> str:
  """The git commit of the code that runs, or 'unknown' outside a checkout."""
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def run_commit(workdir) -> str:
  """The commit a run began with (its commit.txt), or 'unknown' for runs older than that file."""
  path = absolute(workdir) / COMMIT
  return path.read_text().strip() if path.exists() else 'unknown'


def config_differences(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{field: (old value, new value)} for every leaf field that differs between two configs."""
  flat = lambda c: _flatten(json.loads(c.to_json_best_effort()))
  a, b = flat(old), flat(new)
  return {k: (a.get(k, '(absent)'), b.get(k, '(absent)')) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)}


def describe(changes: dict[str, tuple]) -> str:
  """'model.sigma: 5.0 -> 3.0; ...' of config_differences."""
  return '; '.join(f'{field}: {old!r} -> {new!r}' for field, (old, new) in changes.items())


def _flatten(tree, prefix=''):
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f'{prefix}{key}.').items()}


@contextlib.contextmanager
def lock(workdir):
  """Held while a run uses `workdir`: a second run on it fails at once, naming the first. The operating
  system drops the lock when its process dies, so a killed run never blocks the next one. Local and
  network file systems only; on object stores (gs://...) nothing is locked."""
  path = absolute(workdir)
  if '://' in str(path):
    logging.warning('%s is not a local path: it cannot be locked against a second run.', path)
    yield
    return
  path.mkdir(parents=True, exist_ok=True)
  with open(path / '.lock', 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      raise RuntimeError(f'{path} is in use by another run ({holder}); wait for it to finish, stop it, or '
                         'choose another --workdir') from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on {socket.gethostname()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def truncate_events(workdir, step: int) -> None:
  """Drops the TensorBoard events a run wrote after `step` (the steps after its last checkpoint, which
  the resumed run writes again), so that each step appears once in TensorBoard."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path in absolute(workdir).glob('events.out.tfevents.*'):
    records, cut = [], False
    try:
      for record in tf.data.TFRecordDataset(str(path)):
        records.append(record.numpy())
    except tf.errors.DataLossError:  # a record cut short when the run was killed
      cut = True
    kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
    if cut or len(kept) < len(records):
      with tf.io.TFRecordWriter(str(path)) as writer:
        for record in kept:
          writer.write(record)
      logging.info('Dropped %d TensorBoard events after step %d from %s (the resumed run writes those '
                   'steps again).', len(records) - len(kept), step, path.name)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------------------

def _registry():
  """The one item of a step ('default', a whole train state) and its handler, so that a manager can read
  the saved arrays' shapes before it restores anything."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add('default', args, ocp.StandardCheckpointHandler)
  return registry


def manager(directory, best_metric: str | None = None, **options) -> ocp.CheckpointManager:
  """A CheckpointManager of one directory; with `best_metric`, its best_step() is the step whose saved
  metrics hold the largest value of it. Every process must create its managers in the same order (their
  constructors synchronise the processes when they create the directory)."""
  if best_metric:
    options.update(best_fn=lambda metrics: metrics[best_metric], best_mode='max')
  options.setdefault('create', False)  # a manager that only reads creates nothing and waits for no one
  return ocp.CheckpointManager(absolute(directory), handler_registry=_registry(),
                               options=ocp.CheckpointManagerOptions(**options))


def newest_step(directory) -> int | None:
  """The newest finalized step in a checkpoint directory, or None: read from the directory alone,
  without creating a CheckpointManager (a sync point of every process)."""
  directory = absolute(directory)
  return max(ocp.utils.checkpoint_steps(directory), default=None) if directory.exists() else None


def keep(latest: int, best_metric: str) -> ocp.checkpoint_managers.PreservationPolicy:
  """Keeps the newest `latest` steps and the step with the best `best_metric`."""
  policies = ocp.checkpoint_managers
  return policies.AnyPreservationPolicy([
      policies.LatestN(n=latest),
      policies.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                     keep_checkpoints_without_metrics=False)])


def _name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def shapes(tree) -> dict[str, tuple]:
  """{'params/backbone/conv1/kernel': shape, ...} of a state, its abstract shapes or saved metadata."""
  return {name: tuple(getattr(leaf, 'shape', ())) for name, leaf in _named(tree).items()}


def differences(expected: dict, got: dict, limit: int = 3) -> list[str]:
  """The first `limit` arrays whose shapes differ (or that only one side has), parameters first."""
  out = []
  for name in sorted(set(expected) | set(got), key=lambda n: (not n.startswith('params/'), n)):
    if expected.get(name) != got.get(name):
      out.append(f'{name}: model {expected.get(name, "(absent)")}, checkpoint {got.get(name, "(absent)")}')
  return out[:limit]


def saved_shapes(mgr: ocp.CheckpointManager, step: int) -> dict | None:
  """The shapes a step holds, from its metadata alone; None when the metadata cannot be read."""
  try:
    metadata = mgr.metadata(step).item_metadata
  except Exception:  # pylint: disable=broad-except  (any unreadable metadata is reported as damage later)
    return None
  return None if metadata is None else shapes(metadata)


def _bits(x):
  """An array's bits as uint32 words (any dtype, PRNG keys included)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  size = x.dtype.itemsize
  if x.dtype == jnp.bool_ or size == 1:
    return x.astype(jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.uint16 if size == 2 else jnp.uint32).astype(jnp.uint32)


def _checksum(x):
  bits = _bits(x).ravel()
  weights = lax.iota(jnp.uint32, bits.size) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)  # wraps modulo 2^32


def _to_every_process(fn, tree):
  """fn(tree), computed where the tree's shards are, its (small) result fetched by every process."""
  mesh = getattr(jax.tree.leaves(tree)[0].sharding, 'mesh', None)
  out = sharding.replicated(mesh) if isinstance(mesh, jax.sharding.Mesh) else None
  return jax.device_get(jax.jit(fn, out_shardings=out)(tree))


def _checksums(state) -> dict[str, int]:
  """{array name: a uint32 sum of its bits, each word weighted by an odd number of its position}: any one
  changed word changes its array's sum, and so does a moved one."""
  sums = _to_every_process(lambda tree: jax.tree.map(_checksum, tree), _named(state))
  return {name: int(v) for name, v in sums.items()}


def _named(tree) -> dict:
  return {'/'.join(map(_name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def step_metadata(state) -> dict:
  """What each checkpoint step records beside its arrays: their checksums (checked on restore) and the
  parameters' global norm (named in the message of a run that diverged)."""
  norm = float(_to_every_process(optax.tree.norm, state.params)) if hasattr(state, 'params') else None
  return {'checksums': _checksums(state), 'param_norm': norm}


def saved_metadata(mgr: ocp.CheckpointManager, step: int) -> dict:
  """The step_metadata a step was saved with ({} for a step saved without it, or unreadable)."""
  try:
    return dict(mgr.metadata(step).custom_metadata or {})
  except Exception:  # pylint: disable=broad-except  (unreadable metadata is reported as damage later)
    return {}


def restore(mgr: ocp.CheckpointManager, step: int, target):
  """Restores `step` into `target` (a state or its abstract shapes), checking shapes before and after,
  and the arrays against the checksums saved with them."""
  want = shapes(target)
  saved = saved_shapes(mgr, step)
  if saved is not None and saved != want:
    raise CheckpointMismatchError(f'step {step} in {mgr.directory}: {differences(want, saved)}')
  damaged = lambda why: DamagedCheckpointError(
      f'checkpoint step {step} in {mgr.directory} is damaged and cannot be restored ({why})')
  try:
    state = mgr.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # pylint: disable=broad-except  (Orbax, TensorStore and OS errors alike)
    raise damaged(f'{type(e).__name__}: {str(e)[:300]}') from e
  got = shapes(state)  # Orbax restores arrays of any shape into the target
  if got != want:
    raise CheckpointMismatchError(f'step {step} in {mgr.directory}: {differences(want, got)}')
  expected = saved_metadata(mgr, step).get('checksums')
  if expected:  # steps saved before checksums existed are trusted as they are
    wrong = sorted(name for name, v in _checksums(state).items() if expected.get(name) != v)
    if wrong:
      raise damaged(f'{len(wrong)} arrays differ from their checksums, e.g. {wrong[0]}')
  return state


def everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process (each process may read other shards of a checkpoint, so each
  may find other damage): all processes then take the same path."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_newest(mgr: ocp.CheckpointManager, target):
  """(state, step, damaged steps) of the newest step that restores on every process, warning for each
  damaged one newer than it; (None, 0, damaged) when none restores."""
  damaged = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      state, error = restore(mgr, step, target), None
    except DamagedCheckpointError as e:
      state, error = None, e
    if not everywhere(error is None):
      logging.warning('%s; falling back to an earlier step.',
                      error or f'checkpoint step {step} in {mgr.directory} is damaged on another process')
      damaged.append(step)
      continue
    return state, step, damaged
  return None, 0, damaged


def set_aside(directory, steps, why: str = 'damaged') -> None:
  """Moves step folders out of a checkpoint directory (to <directory>_<why>/: damaged steps, or steps
  newer than the one a user resumes from), so that the run can save those step numbers again; their
  files are kept for inspection."""
  directory = absolute(directory)
  for step in steps:
    aside = directory.parent / f'{directory.name}_{why}' / str(step)
    aside.parent.mkdir(parents=True, exist_ok=True)
    if aside.exists():
      aside = aside.parent / f'{step}.{int(time.time())}'
    (directory / str(step)).rename(aside)
    logging.warning('Moved the checkpoint step %d (%s) to %s.', step, why.replace('_', ' '), aside)


def parse_checkpoint(checkpoint) -> str | int:
  """'latest', 'best' or a step number (an int or its digits); anything else is refused."""
  if checkpoint in ('latest', 'best'):
    return checkpoint
  if isinstance(checkpoint, int) or str(checkpoint).isdigit():
    return int(checkpoint)
  raise ValueError(f'checkpoint {checkpoint!r}: expected "latest", "best" or a step number')


def restore_run(run_dir, checkpoint, target, best_metric: str = 'pck@0.1'):
  """(state, step) of a run's checkpoint 'latest' (the newest that restores), 'best' (the evaluated step
  of the largest `best_metric`) or a step number, restored into `target` (abstract shapes with
  shardings, or arrays)."""
  checkpoint = parse_checkpoint(checkpoint)
  directory = absolute(run_dir) / 'checkpoints'
  if checkpoint == 'best' and (directory.parent / 'checkpoints_best').exists():  # the old layout
    directory = directory.parent / 'checkpoints_best'
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoint in {directory}: the folder does not exist')
  with manager(directory, best_metric=best_metric) as mgr:
    steps = mgr.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    if checkpoint == 'latest':
      state, step, damaged = restore_newest(mgr, target)
      if state is None:
        raise DamagedCheckpointError(f'every checkpoint in {directory} is damaged (steps {damaged})')
      return state, step
    step = mgr.best_step() if checkpoint == 'best' else checkpoint
    if step not in steps:
      raise FileNotFoundError(f'no checkpoint {checkpoint!r} in {directory} (steps there: {steps})')
    return restore(mgr, step, target), step


def _full_disk(error: BaseException) -> bool:
  """Whether an error, or one it was raised from, is ENOSPC (Orbax and TensorStore wrap it, or keep
  only its text)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


@contextlib.contextmanager
def disk_full_explained(workdir):
  """Turns a full disk during a checkpoint save (whatever error Orbax surfaces it as) into one
  DiskFullError that names the unfinished step and the steps kept, after removing the unfinished step's
  temporary folder."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (re-raised unless it is a full disk)
    if not _full_disk(e):
      raise
    directory = absolute(workdir) / 'checkpoints'
    unfinished = sorted(directory.glob('*.orbax-checkpoint-tmp*')) if directory.exists() else []
    for path in unfinished:
      shutil.rmtree(path, ignore_errors=True)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []
    failed = ', '.join(p.name.split('.')[0] for p in unfinished)
    where = (f'while saving checkpoint step {failed} in {directory} (its unfinished files are removed)'
             if unfinished else f'while writing to {absolute(workdir)}')
    raise DiskFullError(
        errno.ENOSPC, f'disk full {where}; the checkpoint steps kept are {steps or "none"}. Free space (or '
        'set a smaller config.keep_checkpoints) and run the same command again to resume.') from None
