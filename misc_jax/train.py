"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

Data parallel with `jax.pmap(axis_name='batch')`; one process per host, each reading its own data shards
(input_pipeline.py). Checkpoints are Orbax in `workdir/checkpoints` (latest N) and
`workdir/checkpoints_best` (best validation PCK); a run resumes from the latest one by itself, and its data
order and randomness are functions of the step, so a resumed run ends where an uninterrupted one does.
"""

import functools
import importlib
import json
import os
import signal

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax
from flax import jax_utils
import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from misc_jax import input_pipeline
from misc_jax import kbc
from misc_jax import optim
from misc_jax import visualize
from tfds_builders import build


# ----------------------------------------------------------------------------------------------------------
# Model, state and step.
# ----------------------------------------------------------------------------------------------------------

def create_model(config):
  """config.model.name -> (the module misc_jax/models/<name>.py, its Flax model)."""
  module = importlib.import_module(f'misc_jax.models.{config.model.name}')
  return module, module.from_config(config.model)


def _load_backbone(path: str):
  """A converted backbone (misc_jax.tools.convert_resnet: msgpack of {'params', 'batch_stats'})."""
  return flax.serialization.msgpack_restore(epath.Path(path).read_bytes())


def _merge_backbone(variables, backbone, source: str):
  """variables[col]['backbone'] <- backbone[col] for params and batch_stats, refusing any misfit."""
  shapes = lambda tree: {'/'.join(k): np.shape(v)
                         for k, v in flax.traverse_util.flatten_dict(tree).items()}
  for col in ('params', 'batch_stats'):
    ours = shapes(variables.get(col, {}).get('backbone', {}))
    theirs = shapes(backbone.get(col, {}))
    if ours != theirs:
      diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
      raise ValueError(f'{source}: {col} do not fit the model (first differences: {diff})')
    if theirs:
      variables[col]['backbone'] = backbone[col]
  return variables


def _absolute(path: str) -> epath.Path:
  """Orbax needs absolute paths; URLs (gs://...) are left alone."""
  return epath.Path(path if '://' in str(path) else os.path.abspath(path))


def initial_state(config, model) -> optim.TrainState:
  """Fresh parameters, then config.model.backbone_init (a converted backbone) and config.model.init_from
  (another run's workdir: its latest params and statistics) when set."""
  size = config.input.image_size
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  variables = flax.core.unfreeze(jax.jit(model.init)(jax.random.key(config.seed), images, images))
  if config.model.backbone_init:
    variables = _merge_backbone(variables, _load_backbone(config.model.backbone_init),
                                config.model.backbone_init)
  state = optim.create_train_state(config, model.apply, variables)
  if config.model.init_from:
    path = _absolute(config.model.init_from) / 'checkpoints'
    with ocp.CheckpointManager(path) as mgr:
      if mgr.latest_step() is None:
        raise FileNotFoundError(f'config.model.init_from: no checkpoint in {path}')
      other = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(jax.device_get(state)))
    state = state.replace(params=other.params, batch_stats=other.batch_stats)
  return state


def train_step(state, batch, rng, *, model_module, config):
  """One pmapped AdamW step; gradients and metrics are averaged over all devices of all processes."""
  if config.kbc.train_prob:
    # Per-pair keys from the pair's position in the global batch: the draws do not depend on how the
    # batch is split over devices.
    b = batch['valid'].shape[0]
    index = lax.axis_index('batch') * b + jnp.arange(b)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, state.step), i))(index)
    batch = _kbc_crops(batch, keys, model_module, config)

  def loss_fn(params):
    apply = functools.partial(state.apply_fn, {'params': params, 'batch_stats': state.batch_stats})
    return model_module.train_loss(apply, batch, config)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, 'batch')
  metrics = lax.pmean({'loss': loss, 'grad_norm': optax.global_norm(grads), **aux}, 'batch')
  return state.apply_gradients(grads=grads), metrics


def _kbc_crops(batch, keys, model_module, config):
  """KBC as augmentation: with probability config.kbc.train_prob a pair is seen through crops around the
  keypoints of a random annotated source instance (moved to slot 0) and its ground-truth target keypoints
  (those of every target instance). keys: one per pair."""
  logits = jnp.where(batch['source']['instance_valid'], 0., -jnp.inf)
  pick = jax.vmap(jax.random.categorical)(keys, logits)  # [B]
  batch = dict(batch, source=_move_to_front(batch['source'], pick))
  src_kps, src_valid, trg_kps, valid, _ = model_module.instance_targets(batch)
  b, size = src_kps.shape[0], config.input.image_size
  use = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), config.kbc.train_prob))(keys)
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
  per_instance = ('keypoints', 'keypoint_valid', 'bboxes', 'instance_valid', 'masks')
  return {k: swap(v) if k in per_instance else v for k, v in side.items()}


# ----------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------

class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint and leave at the end of the current step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then stopping.')
    self.requested = True


def _checkpoint_managers(config, workdir):
  """The latest `config.keep_checkpoints` steps and the best evaluated one. Both may save the same step
  at once: across processes their barriers are told apart by a per-manager key prefix."""
  def opts(name, **kw):
    return ocp.CheckpointManagerOptions(
        enable_async_checkpointing=True, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name), **kw)
  latest = ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints',
                                 options=opts('latest', max_to_keep=config.keep_checkpoints))
  best = ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints_best', options=opts(
      'best', max_to_keep=1, best_fn=lambda m: m[config.eval.best_metric], best_mode='max'))
  return latest, best


def evaluator_for(config, model_module, split: str, category_names):
  """The Evaluator of misc_jax/evaluators/<config.eval.evaluator>.py for one split."""
  module = importlib.import_module(f'misc_jax.evaluators.{config.eval.evaluator}')
  return module.Evaluator(config, model_module, split, category_names)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json, written by misc_jax.main)."""
  path = _absolute(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a misc_jax workdir')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_run(workdir: str, checkpoint: str = 'latest', config: ml_collections.ConfigDict | None = None):
  """A finished or running run: (config, model module, restored state, step).

  `checkpoint` is 'latest', 'best' (the best evaluated step) or a step number; `config` defaults to
  `read_config(workdir)`. Errors name the workdir: no config.json, no such checkpoint, or a checkpoint
  that does not fit the config's model.
  """
  config = config or read_config(workdir)
  directory = _absolute(workdir) / ('checkpoints_best' if checkpoint == 'best' else 'checkpoints')
  misfit = f'{directory}: the checkpoint does not fit the model that {workdir}/config.json describes'
  with ocp.CheckpointManager(directory) as mgr:
    steps = mgr.all_steps()
    step = mgr.latest_step() if checkpoint in ('latest', 'best') else int(checkpoint)
    if step is None or step not in steps:
      raise FileNotFoundError(f'no checkpoint {checkpoint!r} in {directory} (steps there: {steps})')
    config.model.init_from = config.model.backbone_init = None  # the checkpoint holds every parameter
    model_module, model = create_model(config)
    target = jax.device_get(initial_state(config, model))
    try:
      state = mgr.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{misfit} ({type(e).__name__}: {str(e)[:300]})') from e
  # Orbax restores arrays of any shape into the target: compare them here.
  shapes = lambda tree: {jax.tree_util.keystr(k): np.shape(v)
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  expected, got = shapes(target), shapes(state)
  if expected != got:
    diff = sorted(set(expected.items()) ^ set(got.items()))[:2]
    raise ValueError(f'{misfit} (first differences, as (parameter, shape): {diff})')
  return config, model_module, state, step


def replicate(tree):
  """A host pytree -> one copy per local device, laid out exactly as pmap lays out its outputs, so the
  step's second call (on its own outputs) does not compile the step again."""
  n = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), tree)
  return jax.pmap(lambda x: x, axis_name='batch')(stacked)


def _host_metrics(pending):
  """Averages the device metrics of the steps since the last flush (the only host sync of the loop)."""
  values = jax.device_get(pending)
  return {k: float(np.mean([v[k][0] for v in values])) for k in values[0]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.total_steps` steps (resuming from workdir if it holds a checkpoint), evaluating
  every config.eval_every_steps and at the end. Returns the last evaluation's metrics."""
  workdir = _absolute(workdir)
  lead = jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not lead)
  if lead:
    build.build(config.dataset.name, config.dataset.data_dir)  # no-op when it is already built
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('dataset ready')
  builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
  category_names = builder.info.features['category'].names

  # Model, optimiser, restore.
  model_module, model = create_model(config)
  state = initial_state(config, model)
  latest_mgr, best_mgr = _checkpoint_managers(config, workdir)
  start = latest_mgr.latest_step() or 0
  if start:
    state = latest_mgr.restore(start, args=ocp.args.StandardRestore(jax.device_get(state)))
    logging.info('Resumed from %s at step %d.', latest_mgr.directory, start)
  p_state = replicate(state)
  rng = replicate(jax.random.key_data(jax.random.key(config.seed + 1)))
  p_train_step = jax.pmap(
      lambda s, b, r: train_step(s, b, jax.random.wrap_key_data(r), model_module=model_module,
                                 config=config),
      axis_name='batch', donate_argnums=(0,))
  evaluator = evaluator_for(config, model_module, config.dataset.eval_split, category_names)

  def save(step, metrics=None):
    host = jax.device_get(jax_utils.unreplicate(p_state))
    latest_mgr.save(step, args=ocp.args.StandardSave(host))
    if metrics is not None:
      best_mgr.save(step, args=ocp.args.StandardSave(host), metrics=metrics)

  def evaluate(step):
    metrics, first = evaluator.evaluate(p_state)
    scalars = {f'eval/{k}': v for k, v in metrics.items() if isinstance(v, float)}
    writer.write_scalars(step, scalars)
    logging.info('step %d %s: %s', step, config.dataset.eval_split, json.dumps(scalars))
    if lead:
      (workdir / 'eval').mkdir(exist_ok=True)
      (workdir / 'eval' / f'{config.dataset.eval_split}_{step:08d}.json').write_text(
          json.dumps(dict(step=step, split=config.dataset.eval_split, **metrics), indent=2))
      evaluator.plot(first, str(workdir / 'predictions.png'))
    return metrics

  # Loop.
  preemption = _Preemption()
  batches = input_pipeline.train_iterator(config, start_step=start) if start < config.total_steps \
      else iter(())
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not lead, desc='train',
                  dynamic_ncols=True)
  pending, metrics, stop = [], {}, False
  for step in range(start + 1, config.total_steps + 1):
    p_state, step_metrics = p_train_step(p_state, next(batches), rng)
    pending.append(step_metrics)
    bar.update()
    report(step)
    stop = preemption.requested  # read once: a SIGTERM may land anywhere in this iteration
    is_last = step == config.total_steps
    log_now = step % config.log_every_steps == 0 or is_last or stop
    eval_now = step % config.eval_every_steps == 0 or is_last
    save_now = step % config.checkpoint_every_steps == 0 or is_last or stop
    if log_now or eval_now or save_now:
      train = _host_metrics(pending)
      pending = []
      if not all(np.isfinite(v) for v in train.values()):
        raise FloatingPointError(
            f'non-finite training metrics at step {step}: {train}; the last good checkpoint '
            f'(step {latest_mgr.latest_step()}) is kept in {latest_mgr.directory}')
      writer.write_scalars(step, {f'train/{k}': v for k, v in train.items()})
      bar.set_postfix(loss=f'{train["loss"]:.4f}')
    if eval_now:
      metrics = evaluate(step)
    if save_now:
      save(step, {config.eval.best_metric: metrics[config.eval.best_metric]} if eval_now else None)
    if stop:
      logging.warning('Saved step %d after SIGTERM; stopping.', step)
      break
  bar.close()
  if start >= config.total_steps:  # nothing to train (e.g. evaluating an init_from model)
    metrics = evaluate(start)
  latest_mgr.wait_until_finished()
  best_mgr.wait_until_finished()
  writer.flush()
  if lead and not stop:
    visualize.plot_learning_curve(str(workdir), str(workdir / 'learning_curve.png'))
  return metrics
