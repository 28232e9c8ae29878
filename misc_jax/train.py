"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

One `jax.jit` step over the device mesh of `config.mesh` (misc_jax/sharding.py): the batch split over the
data axes, the state over `fsdp` (replicated on the default all-`batch` mesh, which is plain data
parallelism over every chip). One process per host, each feeding its own pairs (input_pipeline.py).
Checkpoints are asynchronous Orbax saves of the sharded state in `workdir/checkpoints` (the latest N and
the best evaluated step), every process writing its own shards; a run resumes from the newest one by
itself, on any mesh, and its data order and randomness are functions of the step, so a resumed run ends
where an uninterrupted one does. A SIGTERM (or Ctrl-C) on any process stops every process after the same
step, with a checkpoint of it: the processes agree through a flag reduced inside the step.
"""

import functools
import importlib
import json
import signal

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import PIL.Image
import tqdm

from misc_jax import input_pipeline
from misc_jax import kbc
from misc_jax import optim
from misc_jax import rundir
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import visualize
from misc_jax.models import supervision
from tfds_builders import build


# ----------------------------------------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------------------------------------

def resolve_schedule(config, builder) -> ml_collections.ConfigDict:
  """config with its schedule in steps for the built dataset's training split (optim.resolve_schedule);
  a training or evaluation split the dataset lacks is refused, naming those it has."""
  for field in ('train_split', 'eval_split'):
    split = config.dataset[field].split('[')[0]  # 'train[:200]' names the split 'train'
    if split not in builder.info.splits:
      raise ValueError(f'{config.dataset.name} has no split {split!r} (config.dataset.{field}); it has '
                       f'{sorted(builder.info.splits)}')
  split = config.dataset.train_split
  return optim.resolve_schedule(config, builder.info.splits[split].num_examples)


def check_config(config) -> None:
  """Fails fast, before a dataset is built or a file written, on a config that cannot run here: a mesh
  that does not fit the devices, a global batch they do not divide, a `spatial` axis the model or the
  processes cannot use, weight files that are missing or not what the config says (state.check_weights),
  KBC's second pass asked of an evaluator that has none."""
  devices, batch = sharding.data_parallel_size(sharding.make_mesh(config)), config.batch_size
  if batch % devices:
    raise ValueError(f'config.batch_size={batch} (the global batch) does not divide over the {devices} '
                     f'data-parallel devices (config.mesh batch x fsdp): set it to a multiple of {devices}, '
                     f'e.g. {devices * max(1, batch // devices)}')
  spatial = sharding.mesh_config(config).spatial
  if spatial > 1 and not getattr(state_lib.create_model(config)[0], 'SPLITS_VOLUME', False):
    raise ValueError(f'config.mesh.spatial={spatial}: model {config.model.name!r} does not split its '
                     'correlation volume over chips (kbcnet does); set config.mesh.spatial=1')
  if jax.local_device_count() % spatial:  # each process feeds its own pairs: a pair's chips share one
    raise ValueError(f'config.mesh.spatial={spatial} must divide the {jax.local_device_count()} devices of '
                     'a process: the chips that split a pair must belong to the process that reads it')
  if config.kbc.eval and config.eval.evaluator != 'pck':
    raise ValueError(f'config.kbc.eval=True: the {config.eval.evaluator!r} evaluator has no KBC pass (only '
                     "'pck' does); set config.kbc.eval=False")
  state_lib.check_weights(config.model)


# ----------------------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------------------

def train_step(state, batch, rng, *, model_module, config):
  """One AdamW step on the global batch (jit partitions it over the mesh: the gradient's mean over the
  batch becomes an all-reduce over the data axes)."""
  if config.kbc.train_prob:
    # Per-pair keys from the pair's position in the global batch: the draws do not depend on the mesh.
    index = jnp.arange(batch['valid'].shape[0])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, state.step), i))(index)
    batch = _kbc_crops(batch, keys, config)

  def loss_fn(params):
    apply = functools.partial(state.apply_fn, {'params': params, 'batch_stats': state.batch_stats})
    return model_module.train_loss(apply, batch, config)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **aux}
  return state.apply_gradients(grads=grads), metrics


def train_steps(state, batches, rng, *, model_module, config):
  """config.steps_per_dispatch = k training steps in one call: a scan of `train_step` over batches
  stacked on a leading axis [k, ...]. The parameters are those of k single calls (the data, the rng of
  each step and the optimiser see the same values); one dispatch launches the work of k steps, so the host
  keeps up with an accelerator whose step is shorter than its own launch cost. Metrics: [k, ...].

  XLA:CPU runs a loop's body several times slower than the same computation outside a loop
  (docs/performance.md), so k = 1 calls the step without the scan, and config.unroll_dispatch unrolls it
  (one compiled copy of the step per step of the dispatch)."""
  step = functools.partial(train_step, rng=rng, model_module=model_module, config=config)
  if jax.tree.leaves(batches)[0].shape[0] == 1:
    state, metrics = step(state, jax.tree.map(lambda x: x[0], batches))
    return state, jax.tree.map(lambda x: x[None], metrics)
  return lax.scan(lambda s, b: step(s, b), state, batches, unroll=bool(config.get('unroll_dispatch')))


def check_dispatch(config, start: int) -> int:
  """config.steps_per_dispatch, checked: the schedule's and the loop's step counts must be multiples of
  it, since logs, evaluations, checkpoints and preemption happen between dispatches."""
  k = config.get('steps_per_dispatch', 1)
  fields = {'total_steps': config.total_steps, 'log_every_steps': config.log_every_steps,
            'eval_every_steps': config.eval_every_steps,
            'checkpoint_every_steps': config.checkpoint_every_steps, 'the resumed step': start}
  bad = {name: value for name, value in fields.items() if value % k}
  if bad:
    listed = ', '.join(f'{n} ({v})' for n, v in bad.items())
    raise ValueError(f'config.steps_per_dispatch={k} must divide {listed}')
  return k


def _kbc_crops(batch, keys, config):
  """KBC as augmentation: with probability config.kbc.train_prob a pair is seen through crops around the
  keypoints of a random annotated source instance (moved to slot 0) and around the ground-truth keypoints
  of one random target instance: at test time the target crop frames the instance the coarse pass agrees
  on (kbc.agreeing), not all of them (docs/kbc.md: 31.5 / 30.9% PCK@0.1 against 27.0 / 26.3% at 2x).
  keys: one per pair."""
  logits = jnp.where(batch['source']['instance_valid'], 0., -jnp.inf)
  pick = jax.vmap(jax.random.categorical)(keys, logits)  # [B]
  batch = dict(batch, source=_move_to_front(batch['source'], pick))
  src_kps, src_valid, trg_kps, valid, _ = supervision.instance_targets(batch)
  b, size = src_kps.shape[0], config.input.image_size
  use = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), config.kbc.train_prob))(keys)
  target_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
  j = jax.vmap(jax.random.categorical)(target_keys, jnp.where(valid.any(-1), 0., -jnp.inf))  # [B]
  trg_kps, valid = supervision.take_instance(trg_kps, j), supervision.take_instance(valid, j)  # [B, K, ...]
  identity = kbc.identity(b)
  chosen = lambda crop: kbc.Crop(*(jnp.where(use.reshape((b,) + (1,) * (c.ndim - 1)), c, i)
                                   for c, i in zip(crop, identity)))
  src_crop, trg_crop = map(chosen, kbc.ground_truth_crops(src_kps, src_valid, trg_kps, valid, size,
                                                          config.kbc))
  return dict(batch, source=kbc.crop_side(batch['source'], src_crop),
              target=kbc.crop_side(batch['target'], trg_crop))


def _move_to_front(side, pick):
  """Swaps instance `pick[b]` into slot 0 of every per-instance field of one side."""
  def swap(x):
    idx = jnp.arange(x.shape[1])[None, :]
    order = jnp.where(idx == 0, pick[:, None], jnp.where(idx == pick[:, None], 0, idx))  # [B, I]
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), 1)
  per_instance = ('keypoints', 'keypoint_valid', 'bboxes', 'instance_valid', 'masks', 'dense_points',
                  'dense_valid')
  return {k: swap(v) if k in per_instance else v for k, v in side.items()}


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------

class _Preemption:
  """Remembers a SIGTERM or a Ctrl-C, so that the loop checkpoints and leaves after the step on which the
  processes agree (`sharding.flags`); a second Ctrl-C interrupts at once. The previous handlers come
  back when the loop ends."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested:
      signal.default_int_handler(signum, frame)
    logging.warning('%s: saving a checkpoint after this step, then stopping%s.', signal.Signals(signum).name,
                    ' (Ctrl-C again: stop at once)' if signum == signal.SIGINT else '')
    self.requested = True


def _checkpoint_manager(config, run_dir) -> ocp.CheckpointManager:
  """Asynchronous saves of the sharded state; keeps the latest `config.keep_checkpoints` steps and the
  best evaluated one (its metrics live in the step's metadata)."""
  metric = config.eval.best_metric
  return rundir.manager(run_dir / 'checkpoints', best_metric=metric, create=True,
                        enable_async_checkpointing=True,
                        preservation_policy=rundir.keep(config.keep_checkpoints, metric))


def _restore_or_init(config, model, mesh, run_dir):
  """(state, step) of the newest checkpoint of run_dir that restores, straight into the mesh's shardings;
  else (the initial state, 0). With config.resume_step, the steps after it are moved aside first (to
  checkpoints_set_aside/). Damaged newer steps are named in a warning and moved aside (rundir.set_aside),
  so the run can save those steps again. Every process takes the same path."""
  directory = run_dir / 'checkpoints'
  if config.get('resume_step') is not None:
    _set_aside_after(directory, config.resume_step)
  restored, step, damaged = None, 0, []
  if directory.exists():
    target, _ = state_lib.sharded_shapes(config, model, mesh)
    with rundir.manager(directory) as mgr:
      restored, step, damaged = rundir.restore_newest(mgr, target)
  if damaged:
    if jax.process_index() == 0:
      rundir.set_aside(directory, damaged)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
  if restored is None:
    return state_lib.initial_state(config, model, mesh), 0
  logging.info('Resumed from %s at step %d.', directory, step)
  return restored, step


def _set_aside_after(directory, resume_step: int) -> None:
  """Moves the checkpoints after `resume_step` aside, so that the run resumes from that step."""
  steps = []
  if directory.exists():
    with rundir.manager(directory) as mgr:
      steps = mgr.all_steps()
  if resume_step not in steps:
    raise FileNotFoundError(f'config.resume_step={resume_step}: there is no checkpoint step {resume_step} in '
                            f'{directory}; its steps are {sorted(steps) or "none"}')
  newer = [s for s in steps if s > resume_step]
  if newer and jax.process_index() == 0:
    rundir.set_aside(directory, newer, why='set_aside')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('newer checkpoints set aside')


def _diverged(step: int, metrics: dict, mgr, confirmed: int) -> FloatingPointError:
  """The error of a run whose training metrics became non-finite: the checkpoints there are, with their
  parameters' norms, and which step to resume from. A step saved after `confirmed` (the last step whose
  metrics were finite) may hold diverged parameters, which are finite but give non-finite losses."""
  mgr.wait_until_finished()
  steps = sorted(mgr.all_steps())
  norm = lambda s: rundir.saved_metadata(mgr, s).get('param_norm')
  listed = ', '.join(f'{s} (parameter norm {norm(s):.3g})' if norm(s) is not None else str(s) for s in steps)
  good = [s for s in steps if s < confirmed]
  advice = (f'Steps after {good[-1]} may already hold diverged parameters (no finite metrics were computed '
            f'from them): resume from step {good[-1]} with --config.resume_step={good[-1]}, e.g. with a smaller '
            'learning rate.' if good else
            'None of them is confirmed by finite metrics after it: start again in a new --workdir, e.g. '
            'with a smaller learning rate.')
  return FloatingPointError(f'non-finite training metrics at step {step}: {metrics}. Checkpoints in '
                            f'{mgr.directory}: {listed or "none"}. {advice}')


def evaluator_for(config, model_module, split: str, category_names, mesh=None):
  """The Evaluator of misc_jax/evaluators/<config.eval.evaluator>.py for one split, on `mesh` (default:
  config.mesh)."""
  module = importlib.import_module(f'misc_jax.evaluators.{config.eval.evaluator}')
  return module.Evaluator(config, model_module, split, category_names, mesh or sharding.make_mesh(config))


def compile_step(config, model_module, mesh, state_shardings):
  """The jitted dispatch of k training steps: (state, batches [k, B, ...], rng, preemption flags) ->
  (state, metrics [k], whether any process asked to stop). The state is donated and keeps its
  shardings, so the second call runs the same program."""
  def dispatch(state, batches, rng, stop_flags):
    state, metrics = train_steps(state, batches, rng, model_module=model_module, config=config)
    return state, metrics, jnp.any(stop_flags)

  rep = sharding.replicated(mesh)
  return jax.jit(dispatch, in_shardings=(state_shardings, sharding.batch_sharding(mesh, stacked=True), rep,
                                         None),
                 out_shardings=(state_shardings, rep, rep), donate_argnums=(0,))


def _host_metrics(pending):
  """Averages the metrics ([steps] each, replicated) of the dispatches since the last flush (the only
  host sync of the loop, with the preemption flag)."""
  values = jax.device_get(pending)
  return {k: float(np.mean([v[k] for v in values])) for k in values[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.total_steps` steps (resuming from workdir if it holds a checkpoint), evaluating
  every config.eval_every_steps and at the end. Returns the last evaluation's metrics."""
  check_config(config)
  run_dir = rundir.absolute(workdir)
  lead = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(run_dir), just_logging=not lead)
  if lead:
    build.build(config.dataset.name, config.dataset.data_dir)  # no-op when it is already built
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset ready')
  builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
  category_names = builder.info.features['category'].names
  config = resolve_schedule(config, builder)

  # Mesh, model, state (restored, or initialised in its shardings), step.
  mesh = sharding.make_mesh(config)
  model_module, model = state_lib.create_model(config)
  state, start = _restore_or_init(config, model, mesh, run_dir)
  if jax.process_count() > 1:  # every process has looked for checkpoints before any creates the directory
    multihost_utils.sync_global_devices('resumed')
  k = check_dispatch(config, start)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = compile_step(config, model_module, mesh, state_shardings)
  rng = jax.jit(lambda: jax.random.key(config.seed + 1), out_shardings=sharding.replicated(mesh))()
  evaluator = evaluator_for(config, model_module, config.dataset.eval_split, category_names, mesh)
  mgr = _checkpoint_manager(config, run_dir)

  def save(step, metrics=None):
    mgr.save(step, args=ocp.args.StandardSave(state), metrics=metrics,
             custom_metadata=rundir.step_metadata(state))

  def evaluate(step):
    metrics, first = evaluator.evaluate(state)
    scalars = {f'eval/{k}': v for k, v in metrics.items() if isinstance(v, float)}
    writer.write_scalars(step, scalars)
    logging.info('step %d %s: %s', step, config.dataset.eval_split, json.dumps(scalars))
    if lead:
      (run_dir / 'eval').mkdir(exist_ok=True)
      (run_dir / 'eval' / f'{config.dataset.eval_split}_{step:08d}.json').write_text(
          json.dumps(dict(step=step, split=config.dataset.eval_split, **metrics), indent=2))
      evaluator.plot(first, str(run_dir / 'predictions.png'))
      # The same figure in TensorBoard, one per evaluation: the first evaluation batch (fixed pairs).
      writer.write_images(step, {'predictions': np.asarray(PIL.Image.open(run_dir / 'predictions.png')
                                                           .convert('RGB'))[None]})
    return metrics

  if lead and start:
    rundir.truncate_events(run_dir, start)  # the steps after the checkpoint are written again

  # Loop. The manager is closed (pending saves finished) however the loop ends, and a Ctrl-C during that
  # wait is a second one. Each iteration reads the previous dispatch's agreed stop flag, so the host stays
  # one dispatch ahead of the devices. A full disk while saving ends the run with one DiskFullError.
  bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not lead, desc='train', dynamic_ncols=True)
  with rundir.disk_full_explained(run_dir), _Preemption() as preemption, mgr, bar:
    batches = input_pipeline.train_iterator(config, start_step=start, steps_per_batch=k) \
        if start < config.total_steps else iter(())
    batches = sharding.prefetch(batches, mesh, config.input.prefetch, stacked=True)
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    pending, metrics, stop, agreed, confirmed = [], {}, False, None, start
    for step in range(start + k, config.total_steps + 1, k):
      with jax.set_mesh(mesh):  # a model may split its volume over the mesh (sharding.spatial_size)
        state, step_metrics, stop_now = step_fn(state, next(batches), rng,
                                                sharding.flags(mesh, preemption.requested))
      stop, agreed = agreed is not None and bool(agreed), stop_now  # the same on every process
      pending.append(step_metrics)
      bar.update(k)
      report(step)
      is_last = step == config.total_steps
      log_now = step % config.log_every_steps == 0 or is_last or stop
      eval_now = step % config.eval_every_steps == 0 or is_last
      save_now = step % config.checkpoint_every_steps == 0 or is_last or stop
      if log_now or eval_now or save_now:
        train = _host_metrics(pending)
        pending = []
        if not all(np.isfinite(v) for v in train.values()):
          raise _diverged(step, train, mgr, confirmed)
        confirmed = step  # finite metrics from the parameters of every step before it
        writer.write_scalars(step, {f'train/{k}': v for k, v in train.items()})
        bar.set_postfix(loss=f'{train["loss"]:.4f}')
      if eval_now:
        metrics = evaluate(step)
      if save_now:
        save(step, {config.eval.best_metric: metrics[config.eval.best_metric]} if eval_now else None)
      if stop:
        logging.warning('Saved step %d after a stop request; stopping.', step)
        break
    if start >= config.total_steps:  # nothing to train (e.g. evaluating an init_from model)
      metrics = evaluate(start)
      if start == 0:  # saved, so that misc-jax-evaluate and misc-jax-predict work on the run
        save(0, {config.eval.best_metric: metrics[config.eval.best_metric]})
  writer.flush()
  if lead and not stop:
    visualize.plot_learning_curve(str(run_dir), str(run_dir / 'learning_curve.png'))
  return metrics
