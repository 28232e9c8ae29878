"""The optimiser: frozen stages get no gradient and no update, the rest do; the schedule in epochs; the
learning-rate rule for other global batches."""

import jax
import numpy as np
import optax
import pytest

from misc_jax import state as state_lib
from misc_jax import input_pipeline
from misc_jax import optim
from misc_jax import train


def test_frozen_stages_get_no_gradient_and_no_update(smoke_config):
  """Stages 0-1 (stem, layer1) frozen: their gradients are exactly zero (stop_gradient at the boundary,
  so they neither cost a backward pass nor take a share of the clipping norm) and they never move."""
  with smoke_config.unlocked():
    smoke_config.model.freeze_stages = 2
  model_module, model = state_lib.create_model(smoke_config)
  state = state_lib.initial_state(smoke_config, model)
  labels = optim.param_labels(state.params, smoke_config.model)
  assert labels['backbone']['conv1']['kernel'] == 'frozen'
  assert labels['backbone']['layer1_0']['conv1']['kernel'] == 'frozen'
  assert labels['backbone']['layer2_0']['conv1']['kernel'] == 'backbone'
  assert labels['csfa']['proj0']['kernel'] == 'head'
  batch = next(input_pipeline.train_iterator(smoke_config))

  @jax.jit
  def grads_and_update(state):
    def loss(params):
      apply = lambda s, t: state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, s, t)
      return model_module.train_loss(apply, batch, smoke_config)[0]
    grads = jax.grad(loss)(state.params)
    return grads, state.apply_gradients(grads=grads).apply_gradients(grads=grads)  # step 0 has lr 0

  grads, new = grads_and_update(state)
  frozen = [g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if path[1].key in ('conv1', 'bn1', 'layer1_0')]
  assert frozen and all(not np.any(g) for g in frozen)
  assert np.any(grads['backbone']['layer2_0']['conv1']['kernel'])
  np.testing.assert_array_equal(new.params['backbone']['layer1_0']['conv1']['kernel'],
                                state.params['backbone']['layer1_0']['conv1']['kernel'])
  assert not np.array_equal(new.params['backbone']['layer2_0']['conv1']['kernel'],
                            state.params['backbone']['layer2_0']['conv1']['kernel'])


def test_epochs_give_the_steps_and_the_learning_rate_follows_the_batch(smoke_config):
  with smoke_config.unlocked():
    smoke_config.total_steps = None
    smoke_config.num_epochs = 2.5
    smoke_config.optim.warmup_epochs = 0.5
    smoke_config.optim.reference_batch_size = 8
    smoke_config.batch_size = 32
  config = optim.resolve_schedule(smoke_config, num_examples=1000)
  assert config.total_steps == 79 and config.optim.warmup_steps == 16  # ceil(2.5 * 1000 / 32), ceil(15.6)
  assert optim.lr_scale(config) == pytest.approx(2.)  # sqrt(32 / 8)
  with config.unlocked():
    config.optim.lr_scaling = 'linear'
  assert optim.lr_scale(config) == pytest.approx(4.)
  with config.unlocked():
    config.total_steps = 5  # an explicit step count wins
  assert optim.resolve_schedule(config, 1000).total_steps == 5
  with pytest.raises(ValueError, match='set config.num_epochs or config.total_steps'):
    with smoke_config.unlocked():
      smoke_config.num_epochs = None
    optim.resolve_schedule(smoke_config, 1000)
  # The rate the optimiser reaches at the end of the warmup is the scaled one: with a constant gradient
  # Adam's step is the learning rate itself.
  with config.unlocked():
    config.optim.lr_scaling = 'sqrt'
    config.total_steps = 79
  params = {'head': np.zeros(3, np.float32)}
  tx = optim.create_optimizer(config, params)
  opt_state, grads = tx.init(params), {'head': np.ones(3, np.float32)}
  for _ in range(config.optim.warmup_steps + 1):
    updates, opt_state = tx.update(grads, opt_state, params)
  np.testing.assert_allclose(updates['head'], -2 * config.optim.lr, rtol=1e-3)


def test_weight_decay_shrinks_kernels_only_and_spares_the_score_heads(smoke_config):
  """With a zero gradient AdamW's update is the decay alone: it reaches the decoder's and CSFA's kernels,
  not biases, norm scales, embeddings or the `*_head` modules."""
  with smoke_config.unlocked():
    smoke_config.optim.weight_decay = 0.5
    smoke_config.optim.warmup_steps = 0  # the first step at the full rate
  _, model = state_lib.create_model(smoke_config)
  state = state_lib.initial_state(smoke_config, model)
  updates, _ = state.tx.update(jax.tree.map(np.zeros_like, state.params), state.opt_state, state.params)
  moved = lambda *path: bool(np.any(_at(updates, path)))
  assert moved('decoder', 'block1', 'CenterPivotConv4d_0', 'conv_a', 'kernel')
  assert moved('csfa', 'proj0', 'kernel')
  for still in (('decoder', 'block1', 'CenterPivotConv4d_0', 'conv_a', 'bias'),
                ('decoder', 'block1', 'GroupNorm_0', 'scale'), ('csfa', 'scale_embedding'),
                ('corr_head', 'kernel'), ('refine_head', 'kernel')):
    assert not moved(*still), still


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize('spec, pairs', [('kbcnet_spair', 53_340), ('kbcnet_dinov2_spair', 53_340)])
def test_the_spair_recipes_do_not_decay_the_weights_away(spec, pairs):
  """Over the whole schedule, decay alone multiplies a kernel by exp(-sum_t lr_t wd): the recipe keeps that
  above 0.9 (CHM's rates with CATs' decay of 0.05 gave exp(-4.2) = 0.015)."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = optim.resolve_schedule(importlib.import_module(f'configs.{spec}').get_config(), pairs)
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(0., o.lr, o.warmup_steps, config.total_steps,
                                                end_value=o.lr * o.final_lr_fraction)
  shrink = np.exp(-o.weight_decay * float(np.sum(schedule(np.arange(config.total_steps)))))
  assert shrink > 0.9, (spec, shrink)


def test_a_config_that_cannot_run_here_fails_at_start_naming_why():
  from configs import kbcnet_spair  # pylint: disable=g-import-not-at-top
  config = kbcnet_spair.get_config()  # ResNet-101 with frozen BatchNorm, no weights given
  with pytest.raises(ValueError, match="config.model.backbone 'resnet' is meant to start from pretrained"):
    train.check_config(config)
  config.model.backbone_from_scratch = True
  train.check_config(config)
  config.batch_size = 12
  with pytest.raises(ValueError, match=r'batch_size=12 .* does not divide over the 8 data-parallel devices '
                                       r'\(config.mesh batch x fsdp\): set it to a multiple of 8'):
    train.check_config(config)
  config.mesh.spatial = 4  # 2 data-parallel devices, each pair's volume over 4 chips
  train.check_config(config)
  config.mesh.spatial = 1
  from configs import misc210k_dualpath  # pylint: disable=g-import-not-at-top
  dual = misc210k_dualpath.get_config()
  dual.mesh.spatial = 2
  with pytest.raises(ValueError, match="config.mesh.spatial=2: model 'dual_path' does not split"):
    train.check_config(dual)
  config.batch_size = 16
  config.eval.evaluator = 'misc'  # kbcnet_spair evaluates with KBC's second pass, which only 'pck' has
  with pytest.raises(ValueError, match="config.kbc.eval=True: the 'misc' evaluator has no KBC pass"):
    train.check_config(config)
