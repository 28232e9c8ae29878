"""The optimiser: frozen stages get no updates, the rest do."""

import jax
import numpy as np

from misc_jax import optim
from misc_jax import train


def test_freezing_stages_zeroes_their_updates(smoke_config):
  with smoke_config.unlocked():
    smoke_config.model.freeze_stages = 2  # stem and layer1
  model = train.create_model(smoke_config)[1]
  state = train.initial_state(smoke_config, model)
  labels = optim.param_labels(state.params, 2)
  assert labels['backbone']['conv1']['kernel'] == 'frozen'
  assert labels['backbone']['layer1_0']['conv1']['kernel'] == 'frozen'
  assert labels['backbone']['layer2_0']['conv1']['kernel'] == 'backbone'
  assert labels['csfa']['proj0']['kernel'] == 'head'
  grads = jax.tree.map(np.ones_like, state.params)
  new = state.apply_gradients(grads=grads).apply_gradients(grads=grads)  # step 0 has lr 0 (warmup)
  np.testing.assert_array_equal(new.params['backbone']['layer1_0']['conv1']['kernel'],
                                state.params['backbone']['layer1_0']['conv1']['kernel'])
  assert not np.array_equal(new.params['backbone']['layer2_0']['conv1']['kernel'],
                            state.params['backbone']['layer2_0']['conv1']['kernel'])
