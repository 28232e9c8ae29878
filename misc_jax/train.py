"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

Data parallel with `jax.pmap(axis_name='batch')`; one process per host, each reading its own data shards
(input_pipeline.py). Checkpoints are Orbax in `workdir/checkpoints` (latest N) and
`workdir/checkpoints_best` (best validation PCK); a run resumes from the latest one by itself, and its data
order and randomness are functions of the step, so a resumed run ends where an uninterrupted one does.
"""

import functools
import importlib
import json
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
from misc_jax import rundir
from misc_jax import visualize
from misc_jax.models import kbcnet
from misc_jax.models import supervision
from tfds_builders import build


# ----------------------------------------------------------------------------------------------------------
# Model, state and step.
# ----------------------------------------------------------------------------------------------------------

def create_model(config):
  """config.model.name -> (the module misc_jax/models/<name>.py, its Flax model)."""
  module = importlib.import_module(f'misc_jax.models.{config.model.name}')
  return module, module.from_config(config.model)


def load_backbone(path: str) -> dict:
  """A converted backbone (misc_jax.tools.convert_resnet: msgpack of {'params', 'batch_stats'}); errors
  name the file."""
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(f'config.model.backbone_init: {path} does not exist') from None
  except OSError as e:
    raise OSError(f'config.model.backbone_init: cannot read {path} ({e.strerror})') from e
  try:
    backbone = flax.serialization.msgpack_restore(data)
  except Exception as e:  # pylint: disable=broad-except  (msgpack raises several unrelated types)
    raise ValueError(f'config.model.backbone_init: {path} is not a converted backbone (a msgpack file '
                     f'from misc_jax.tools.convert_resnet): {type(e).__name__}: {e}') from None
  if not isinstance(backbone, dict) or 'params' not in backbone:
    raise ValueError(f'config.model.backbone_init: {path} holds no "params": not a converted backbone')
  return backbone


_MSGPACK_MAP = (*range(0x80, 0x90), 0xde, 0xdf)  # first byte of a msgpack map (fixmap, map 16, map 32)


def resolve_schedule(config, builder) -> ml_collections.ConfigDict:
  """config with its schedule in steps for the built dataset's training split (optim.resolve_schedule)."""
  split = config.dataset.train_split
  return optim.resolve_schedule(config, builder.info.splits[split].num_examples)


def check_config(config) -> None:
  """Fails fast, before a dataset is built or a file written, on a config that cannot run here: a global
  batch the devices do not divide, a backbone file that is missing or not a converted backbone, an
  init_from run without checkpoints, a BatchNorm backbone that would train from random weights unasked,
  KBC's second pass asked of an evaluator that has none."""
  devices, batch = jax.device_count(), config.batch_size
  if batch % devices:
    raise ValueError(f'config.batch_size={batch} (the global batch) does not divide over the {devices} '
                     f'devices: set it to a multiple of {devices}, e.g. {devices * max(1, batch // devices)}')
  if config.kbc.eval and config.eval.evaluator != 'pck':
    raise ValueError(f'config.kbc.eval=True: the {config.eval.evaluator!r} evaluator has no KBC pass (only '
                     "'pck' does); set config.kbc.eval=False")
  m = config.model
  if m.backbone_init:
    try:
      with epath.Path(m.backbone_init).open('rb') as f:
        first = f.read(1)
    except FileNotFoundError:
      raise FileNotFoundError(f'config.model.backbone_init: {m.backbone_init} does not exist') from None
    except OSError as e:
      raise OSError(f'config.model.backbone_init: cannot read {m.backbone_init} ({e.strerror})') from e
    if not first or first[0] not in _MSGPACK_MAP:
      raise ValueError(f'config.model.backbone_init: {m.backbone_init} is not a converted backbone (a '
                       'msgpack file from misc_jax.tools.convert_resnet)')
  if m.get('trunk_init') and not epath.Path(m.trunk_init).exists():
    raise FileNotFoundError(f'config.model.trunk_init: {m.trunk_init} does not exist')
  if m.init_from and not (rundir.absolute(m.init_from) / 'checkpoints').exists():
    raise FileNotFoundError(f'config.model.init_from: {m.init_from} holds no checkpoints/ folder')
  if (kbcnet.backbone_module(m).needs_weights(m) and not m.backbone_init and not m.init_from
      and not m.get('trunk_init') and not m.get('backbone_from_scratch')):
    raise ValueError(
        f'config.model.backbone {m.get("backbone", "resnet")!r} is meant to start from pretrained weights '
        '(a ResNet with frozen BatchNorm statistics, or DINOv2), but none are given, so it would train from '
        'random weights. Set config.model.backbone_init to a converted backbone (python -m '
        'misc_jax.tools.convert_resnet or convert_dinov2), or config.model.backbone_from_scratch=True to '
        'do exactly that.')


def _merge(variables, loaded, source: str, modules):
  """variables[col][m] <- loaded[col][m] for params and batch_stats of every module m, refusing any
  misfit (a module the model has but the file lacks counts as one)."""
  shapes = lambda tree: {'/'.join(k): np.shape(v)
                         for k, v in flax.traverse_util.flatten_dict(tree).items()}
  for col in ('params', 'batch_stats'):
    for m in modules:
      ours = shapes(variables.get(col, {}).get(m, {}))
      theirs = shapes(loaded.get(col, {}).get(m, {}))
      if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f'{source}: {col} of the {m} do not fit the model (first differences: {diff})')
      if theirs:
        variables[col][m] = loaded[col][m]
  return variables


TRUNK = ('backbone', 'csfa')  # config.model.trunk_modules' default: what a model takes from trunk_init


def load_trunk(path: str) -> dict:
  """A run's modules exported by misc_jax.tools.export_trunk: {'params': {module: tree}, 'batch_stats',
  'provenance'}; errors name the file."""
  try:
    return flax.serialization.msgpack_restore(epath.Path(path).read_bytes())
  except FileNotFoundError:
    raise FileNotFoundError(f'config.model.trunk_init: {path} does not exist') from None


def _fresh_state(config, model) -> optim.TrainState:
  size = config.input.image_size
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  variables = flax.core.unfreeze(model.init(jax.random.key(config.seed), images, images))
  return optim.create_train_state(config, model.apply, variables)


def state_shapes(config) -> optim.TrainState:
  """The train state's abstract shapes (nothing is computed or read; the schedule does not matter)."""
  if config.total_steps is None:
    config = optim.resolve_schedule(config, config.batch_size)
  return jax.eval_shape(lambda: _fresh_state(config, create_model(config)[1]))


def initial_state(config, model) -> optim.TrainState:
  """Fresh parameters, then config.model.backbone_init (a converted backbone), config.model.trunk_init (an
  exported run, of which the model takes config.model.trunk_modules: by default the trunk, backbone and
  CSFA) and config.model.init_from (another run's workdir: the params and statistics of its checkpoint
  config.model.init_from_checkpoint, 'latest', 'best' or a step) when set."""
  state = jax.jit(lambda: _fresh_state(config, model))()
  m = config.model
  if m.backbone_init or m.get('trunk_init'):
    variables = flax.core.unfreeze(jax.device_get({'params': state.params, 'batch_stats': state.batch_stats}))
    if m.backbone_init:
      backbone = load_backbone(m.backbone_init)
      variables = _merge(variables, {col: {'backbone': tree} for col, tree in backbone.items()},
                         m.backbone_init, ('backbone',))
    if m.get('trunk_init'):
      variables = _merge(variables, load_trunk(m.trunk_init), m.trunk_init, m.get('trunk_modules', TRUNK))
    state = optim.create_train_state(config, model.apply, variables)
  if config.model.init_from:
    try:
      other, _ = rundir.restore_run(config.model.init_from, config.model.init_from_checkpoint,
                                     jax.device_get(state))
    except (FileNotFoundError, ValueError, rundir.DamagedCheckpointError) as e:
      raise type(e)(f'config.model.init_from: {e}') from e
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
    batch = _kbc_crops(batch, keys, config)

  def loss_fn(params):
    apply = functools.partial(state.apply_fn, {'params': params, 'batch_stats': state.batch_stats})
    return model_module.train_loss(apply, batch, config)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, 'batch')
  metrics = lax.pmean({'loss': loss, 'grad_norm': optax.global_norm(grads), **aux}, 'batch')
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
  """Remembers a SIGTERM so the loop can checkpoint and leave at the end of the current step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then stopping.')
    self.requested = True


def _checkpoint_managers(config, run_dir):
  """The latest `config.keep_checkpoints` steps and the best evaluated one. Both may save the same step
  at once: across processes their barriers are told apart by a per-manager key prefix."""
  def opts(name, **kw):
    return dict(enable_async_checkpointing=True, create=True, **kw,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))
  latest = rundir.manager(run_dir / 'checkpoints', **opts('latest', max_to_keep=config.keep_checkpoints))
  best = rundir.manager(run_dir / 'checkpoints_best', **opts(
      'best', max_to_keep=1, best_fn=lambda m: m[config.eval.best_metric], best_mode='max'))
  return latest, best


def _resume(state, run_dir):
  """(state, step) of the newest checkpoint of run_dir that restores, or (state, 0). Damaged newer steps
  are named in a warning and moved aside (rundir.set_aside), so the run can save those steps again."""
  directory = run_dir / 'checkpoints'
  if not directory.exists():
    return state, 0
  with rundir.manager(directory) as mgr:
    restored, step, damaged = rundir.restore_newest(mgr, jax.device_get(state))
  if damaged:
    if jax.process_index() == 0:
      rundir.set_aside(directory, damaged)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('damaged checkpoints set aside')
  if restored is None:
    return state, 0
  logging.info('Resumed from %s at step %d.', directory, step)
  return restored, step


def evaluator_for(config, model_module, split: str, category_names):
  """The Evaluator of misc_jax/evaluators/<config.eval.evaluator>.py for one split."""
  module = importlib.import_module(f'misc_jax.evaluators.{config.eval.evaluator}')
  return module.Evaluator(config, model_module, split, category_names)


def load_run(run_dir: str, checkpoint='latest', config: ml_collections.ConfigDict | None = None):
  """A finished or running run: (config, model module, restored state, step).

  `checkpoint` is 'latest' (the newest step that restores; damaged newer ones are named in a warning),
  'best' (the best evaluated step) or a step number; `config` defaults to the run's config.json. Errors
  name the run: no config.json, no such checkpoint, a damaged one, or one that does not fit the model.
  """
  rundir.parse_checkpoint(checkpoint)  # a bad name fails before the model is built
  config = config or rundir.read_config(run_dir)
  config.model.init_from = config.model.backbone_init = None  # the checkpoint holds every parameter
  if 'trunk_init' in config.model:
    config.model.trunk_init = None
  model_module, model = create_model(config)
  target = jax.device_get(initial_state(config, model))
  try:
    state, step = rundir.restore_run(run_dir, checkpoint, target)
  except rundir.CheckpointMismatchError as e:
    raise ValueError(f'{run_dir}: the checkpoint does not fit the model that {run_dir}/config.json '
                     f'describes (first differences: {e})') from e
  return config, model_module, state, step


def replicate(tree):
  """A host pytree -> one copy per local device, laid out exactly as pmap lays out its outputs, so the
  step's second call (on its own outputs) does not compile the step again."""
  n = jax.local_device_count()
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + np.shape(x)), tree)
  return jax.pmap(lambda x: x, axis_name='batch')(stacked)


def _host_metrics(pending):
  """Averages the device metrics ([devices, steps] each) of the dispatches since the last flush (the only
  host sync of the loop)."""
  values = jax.device_get(pending)
  return {k: float(np.mean([v[k][0] for v in values])) for k in values[0]}


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

  # Model, optimiser, restore.
  model_module, model = create_model(config)
  state, start = _resume(initial_state(config, model), run_dir)
  if jax.process_count() > 1:  # every process has looked for checkpoints before any creates the directory
    multihost_utils.sync_global_devices('resumed')
  latest_mgr, best_mgr = _checkpoint_managers(config, run_dir)
  k = check_dispatch(config, start)
  p_state = replicate(state)
  rng = replicate(jax.random.key_data(jax.random.key(config.seed + 1)))
  p_train_step = jax.pmap(
      lambda s, b, r: train_steps(s, b, jax.random.wrap_key_data(r), model_module=model_module,
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
      (run_dir / 'eval').mkdir(exist_ok=True)
      (run_dir / 'eval' / f'{config.dataset.eval_split}_{step:08d}.json').write_text(
          json.dumps(dict(step=step, split=config.dataset.eval_split, **metrics), indent=2))
      evaluator.plot(first, str(run_dir / 'predictions.png'))
    return metrics

  # Loop. The managers are closed (pending saves finished) however the loop ends.
  with latest_mgr, best_mgr:
    preemption = _Preemption()
    batches = input_pipeline.train_iterator(config, start_step=start, steps_per_batch=k) \
        if start < config.total_steps else iter(())
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    bar = tqdm.tqdm(total=config.total_steps, initial=start, disable=not lead, desc='train',
                    dynamic_ncols=True)
    pending, metrics, stop = [], {}, False
    for step in range(start + k, config.total_steps + 1, k):
      p_state, step_metrics = p_train_step(p_state, next(batches), rng)
      pending.append(step_metrics)
      bar.update(k)
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
      if start == 0:  # saved, so that misc-jax-evaluate and misc-jax-predict work on the run
        save(0, {config.eval.best_metric: metrics[config.eval.best_metric]})
  writer.flush()
  if lead and not stop:
    visualize.plot_learning_curve(str(run_dir), str(run_dir / 'learning_curve.png'))
  return metrics
