"""Optimiser and train state from the config: AdamW, warmup + cosine, clipping, a backbone learning rate,
frozen early stages."""

from typing import Any

import flax
from flax.training import train_state
import ml_collections
import optax


class TrainState(train_state.TrainState):
  batch_stats: Any  # frozen BatchNorm statistics: saved and restored, never updated


def _label(path, freeze_stages: int) -> str:
  """'frozen', 'backbone' or 'head' for a parameter path (a tuple of names)."""
  if path[0] != 'backbone':
    return 'head'
  # Stage 0 is the stem (conv1, bn1); stage i >= 1 is the bottlenecks layer{i}_*.
  stage = int(path[1][5]) if path[1].startswith('layer') else 0
  return 'frozen' if stage < freeze_stages else 'backbone'


def param_labels(params, freeze_stages: int):
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({k: _label(k, freeze_stages) for k in flat})


def create_optimizer(config: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """config.optim: lr, backbone_lr, weight_decay, warmup_steps, grad_clip; config.total_steps;
  config.model.freeze_stages (0: none, 1: the stem, 2: stem and layer1, ...)."""
  o = config.optim

  def adamw(lr):
    decay_steps = max(config.total_steps, o.warmup_steps + 1)  # total_steps=0: evaluation only
    schedule = optax.warmup_cosine_decay_schedule(0., lr, o.warmup_steps, decay_steps,
                                                  end_value=lr * o.final_lr_fraction)
    return optax.adamw(schedule, weight_decay=o.weight_decay)

  labels = param_labels(params, config.model.freeze_stages)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.multi_transform({'head': adamw(o.lr), 'backbone': adamw(o.backbone_lr),
                             'frozen': optax.set_to_zero()}, labels))


def create_train_state(config, apply_fn, variables) -> TrainState:
  params = variables['params']
  return TrainState.create(apply_fn=apply_fn, params=params, tx=create_optimizer(config, params),
                           batch_stats=variables.get('batch_stats', {}))
