"""Optimiser and train state from the config: AdamW, warmup + cosine, clipping, a backbone learning rate,
frozen early stages; the schedule in epochs and the learning-rate rule for other global batches.

When the global batch changes (a pod slice of another size): the epochs stay, so the step count follows
(`resolve_schedule`), and the learning rates `optim.lr`, `optim.backbone_lr`, tuned at
`optim.reference_batch_size`, are scaled by sqrt(batch / reference) (`optim.lr_scaling`: the square-root
rule for Adam-type optimisers; 'linear' and 'none' are there too).
"""

import math
from typing import Any

from absl import logging
import flax
from flax.training import train_state
import ml_collections
import optax

from misc_jax.models import kbcnet

_LR_RULES = {'sqrt': math.sqrt, 'linear': lambda r: r, 'none': lambda r: 1.}


class TrainState(train_state.TrainState):
  batch_stats: Any  # frozen BatchNorm statistics: saved and restored, never updated


def param_labels(params, model_config):
  """'frozen', 'backbone' or 'head' for every parameter; the backbone's module (models/resnet.py,
  models/dinov2.py) says which of its parameters the model cuts off from the gradient."""
  backbone = kbcnet.backbone_module(model_config)

  def label(path):
    if path[0] != 'backbone':
      return 'head'
    return 'frozen' if backbone.is_frozen(path[1:], model_config) else 'backbone'

  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: label(k) for k in flat})


def decay_mask(params):
  """True where AdamW's weight decay applies: the `kernel`s of convolutions and dense layers, except in the
  `*_head` modules (the score heads set the logits' scale against a fixed temperature, which decay would
  flatten). Biases, norms, tokens and embeddings are not decayed."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {k: k[-1] == 'kernel' and not k[0].endswith('_head') for k in flat})


def resolve_schedule(config: ml_collections.ConfigDict, num_examples: int) -> ml_collections.ConfigDict:
  """A copy of config whose config.total_steps (when unset: config.num_epochs over `num_examples` training
  pairs at the global batch) and optim.warmup_steps (from optim.warmup_epochs when that is set) are step
  counts."""
  config = config.copy_and_resolve_references()
  per_epoch = num_examples / config.batch_size
  if config.total_steps is None:
    if config.num_epochs is None:
      raise ValueError('set config.num_epochs or config.total_steps')
    config.total_steps = math.ceil(config.num_epochs * per_epoch)
    logging.info('%g epochs of %d pairs at a global batch of %d: %d steps.', config.num_epochs,
                 num_examples, config.batch_size, config.total_steps)
  if config.optim.get('warmup_epochs') is not None:
    config.optim.warmup_steps = math.ceil(config.optim.warmup_epochs * per_epoch)
  return config


def lr_scale(config: ml_collections.ConfigDict) -> float:
  """The factor on the configured learning rates at this global batch (see the module docstring)."""
  reference = config.optim.get('reference_batch_size')
  if not reference:
    return 1.
  rule = config.optim.get('lr_scaling', 'sqrt')
  if rule not in _LR_RULES:
    raise ValueError(f'config.optim.lr_scaling {rule!r}: expected one of {sorted(_LR_RULES)}')
  return _LR_RULES[rule](config.batch_size / reference)


def create_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """config.optim: lr, backbone_lr (both scaled by `lr_scale`), weight_decay (on `decay_mask`'s
  parameters), warmup_steps, grad_clip; config.total_steps; frozen parameters (config.model: param_labels)
  get no update."""
  o = config.optim
  scale = lr_scale(config)

  def adamw(lr):
    lr *= scale
    decay_steps = max(config.total_steps, o.warmup_steps + 1)  # total_steps=0: evaluation only
    schedule = optax.warmup_cosine_decay_schedule(0., lr, o.warmup_steps, decay_steps,
                                                  end_value=lr * o.final_lr_fraction)
    return optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)

  labels = param_labels(params, config.model)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.multi_transform({'head': adamw(o.lr), 'backbone': adamw(o.backbone_lr),
                             'frozen': optax.set_to_zero()}, labels))


def create_train_state(config, apply_fn, variables) -> TrainState:
  params = variables['params']
  return TrainState.create(apply_fn=apply_fn, params=params, tx=create_optimizer(config, params),
                           batch_stats=variables.get('batch_stats', {}))
