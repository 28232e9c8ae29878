"""The train state: the model named by the config, its fresh parameters laid out on the mesh, and the
weights it starts from (a converted backbone, an exported run's modules, another run's checkpoint), and a
finished run's state read back for evaluation.

Every state here is born sharded: init is jitted with the state's shardings as its output, and loaded
weights are written straight into those shards (`sharding.put`), so no chip ever holds a second copy.
"""

import importlib

from etils import epath
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from misc_jax import optim
from misc_jax import rundir
from misc_jax import sharding
from misc_jax.models import kbcnet

TRUNK = ('backbone', 'csfa')  # config.model.trunk_modules' default: what a model takes from trunk_init
_MSGPACK_MAP = (*range(0x80, 0x90), 0xde, 0xdf)  # first byte of a msgpack map (fixmap, map 16, map 32)


def create_model(config):
  """config.model.name -> (the module misc_jax/models/<name>.py, its Flax model)."""
  module = importlib.import_module(f'misc_jax.models.{config.model.name}')
  return module, module.from_config(config.model)


# ----------------------------------------------------------------------------------------------------------
# Weight files.
# ----------------------------------------------------------------------------------------------------------

def check_weights(model_config) -> None:
  """Fails fast on weight files that are missing or are not what the config says, and on a BatchNorm
  backbone that would train from random weights unasked."""
  m = model_config
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


def load_trunk(path: str) -> dict:
  """A run's modules exported by misc_jax.tools.export_trunk: {'params': {module: tree}, 'batch_stats',
  'provenance'}; errors name the file."""
  try:
    return flax.serialization.msgpack_restore(epath.Path(path).read_bytes())
  except FileNotFoundError:
    raise FileNotFoundError(f'config.model.trunk_init: {path} does not exist') from None


def merge(variables, loaded, source: str, modules):
  """variables[col][m] <- loaded[col][m] (host arrays) for params and batch_stats of every module m,
  refusing any misfit (a module the model has but the file lacks counts as one). Arrays of `variables`
  that are global jax.Arrays receive the loaded values in their own shardings."""
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
        variables[col][m] = jax.tree.map(
            lambda new, old: sharding.put(new, old) if isinstance(old, jax.Array) else new,
            loaded[col][m], variables[col][m])
  return variables


# ----------------------------------------------------------------------------------------------------------
# States.
# ----------------------------------------------------------------------------------------------------------

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


def sharded_shapes(config, model, mesh):
  """(abstract state whose leaves carry their shardings on `mesh`, the shardings)."""
  abstract = jax.eval_shape(lambda: _fresh_state(config, model))
  shardings = sharding.state_shardings(mesh, abstract, config)
  return sharding.abstract_with_shardings(abstract, shardings), shardings


def initial_state(config, model, mesh: jax.sharding.Mesh | None = None) -> optim.TrainState:
  """Fresh parameters on `mesh` (default: config.mesh over every device), then config.model.backbone_init
  (a converted backbone), config.model.trunk_init (an exported run, of which the model takes
  config.model.trunk_modules: by default the trunk, backbone and CSFA) and config.model.init_from (another
  run's workdir: the params and statistics of its checkpoint config.model.init_from_checkpoint, 'latest',
  'best' or a step) when set. AdamW's moments start at zero whatever the weights, so they stay fresh."""
  mesh = mesh or sharding.make_mesh(config)
  target, shardings = sharded_shapes(config, model, mesh)
  # The optimiser's closures are new objects on every trace, so the jitted init returns the leaves and the
  # state takes the structure of `target` (the same static fields as what restores into it).
  leaves = jax.jit(lambda: jax.tree.leaves(_fresh_state(config, model)),
                   out_shardings=jax.tree.leaves(shardings))()
  state = jax.tree.unflatten(jax.tree.structure(target), leaves)
  m = config.model
  if m.backbone_init or m.get('trunk_init'):
    variables = {'params': dict(state.params), 'batch_stats': dict(state.batch_stats)}
    layout = kbcnet.backbone_module(m).weights_layout  # e.g. DINOv2's blocks, stacked or not (scan)
    if m.backbone_init:
      backbone = layout(load_backbone(m.backbone_init), m)
      variables = merge(variables, {col: {'backbone': tree} for col, tree in backbone.items()},
                        m.backbone_init, ('backbone',))
    if m.get('trunk_init'):
      trunk = load_trunk(m.trunk_init)
      if 'backbone' in trunk.get('params', {}):
        trunk['params']['backbone'] = layout({'params': trunk['params']['backbone']}, m)['params']
      variables = merge(variables, trunk, m.trunk_init, m.get('trunk_modules', TRUNK))
    state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
  if m.init_from:
    try:
      other, _ = rundir.restore_run(m.init_from, m.init_from_checkpoint, target,
                                    best_metric=config.eval.best_metric)
    except (FileNotFoundError, ValueError, rundir.DamagedCheckpointError) as e:
      raise type(e)(f'config.model.init_from: {e}') from e
    state = state.replace(params=other.params, batch_stats=other.batch_stats)
  return state


def load_run(run_dir: str, checkpoint='latest', config: ml_collections.ConfigDict | None = None,
             mesh: jax.sharding.Mesh | None = None):
  """A finished or running run: (config, model module, restored state, step).

  `checkpoint` is 'latest' (the newest step that restores; damaged newer ones are named in a warning),
  'best' (the best evaluated step) or a step number; `config` defaults to the run's config.json; the
  state is restored onto `mesh` (default: every device on `batch`, whatever mesh trained it). Errors
  name the run: no config.json, no such checkpoint, a damaged one, or one that does not fit the model.
  """
  rundir.parse_checkpoint(checkpoint)  # a bad name fails before the model is built
  config = config or rundir.read_config(run_dir)
  config.model.init_from = config.model.backbone_init = None  # the checkpoint holds every parameter
  if 'trunk_init' in config.model:
    config.model.trunk_init = None
  model_module, model = create_model(config)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict())
  target, _ = sharded_shapes(config, model, mesh)
  try:
    state, step = rundir.restore_run(run_dir, checkpoint, target, best_metric=config.eval.best_metric)
  except rundir.CheckpointMismatchError as e:
    raise ValueError(f'{run_dir}: the checkpoint does not fit the model that {run_dir}/config.json '
                     f'describes (first differences: {e})') from e
  return config, model_module, state, step
