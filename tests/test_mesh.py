"""The training step on device meshes (8 fake CPU devices): every (batch, fsdp, spatial) layout trains the
same model, FSDP splits the state's bytes, a checkpoint moves between meshes, init leaves no second copy."""

import gc

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from misc_jax import input_pipeline
from misc_jax import rundir
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train

MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (1, 1, 8), (2, 2, 2)]
STEPS = 4


def _config(smoke_config, mesh_shape):
  config = smoke_config.copy_and_resolve_references()
  config.mesh.batch, config.mesh.fsdp, config.mesh.spatial = mesh_shape
  config.mesh.fsdp_min_size = 256  # the smoke model's arrays are small: split most of them
  return config


def _train(config, batches):
  """(losses [STEPS], host params after the first step, final state, the jitted step) on config.mesh."""
  mesh = sharding.make_mesh(config)
  model_module, model = state_lib.create_model(config)
  state = state_lib.initial_state(config, model, mesh)
  step = train.compile_step(config, model_module, mesh, jax.tree.map(lambda x: x.sharding, state))
  losses, first = [], None
  for batch in batches:
    with jax.set_mesh(mesh):  # as train.train_and_evaluate: KBCNet reads the `spatial` axis from it
      state, metrics, _ = step(state, sharding.global_batch(mesh, batch, stacked=True), jax.random.key(1),
                               sharding.flags(mesh, False))
    losses.append(float(metrics['loss'][0]))
    first = jax.device_get(state.params) if first is None else first
  return np.array(losses), first, state, step


@pytest.fixture(scope='module')
def runs(tiny_data_dir):
  """Four steps on the same batches on every mesh of MESHES."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  smoke = synthetic.get_config('smoke')
  smoke.dataset.data_dir = tiny_data_dir
  smoke.total_steps = STEPS
  it = input_pipeline.train_iterator(smoke, steps_per_batch=1)
  batches = [next(it) for _ in range(STEPS)]
  return {shape: _train(_config(smoke, shape), batches) for shape in MESHES}, smoke


@pytest.mark.pod
def test_every_mesh_gives_the_losses_of_the_all_batch_mesh(runs):
  results, _ = runs
  losses, first, _, _ = results[(8, 1, 1)]
  for shape in MESHES[1:]:
    # Other meshes sum the gradient in other orders; Adam amplifies such float noise on parameters whose
    # gradients are near zero, step by step, so the parameters are compared after the first step, and the
    # losses of the later steps more loosely: (2, 4, 1) measured 2.9e-5 apart at step 4.
    np.testing.assert_allclose(results[shape][0][:2], losses[:2], rtol=1e-5, err_msg=str(shape))
    np.testing.assert_allclose(results[shape][0], losses, rtol=1e-4, err_msg=str(shape))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[shape][1],
                 first)


@pytest.mark.pod
def test_fsdp_splits_the_large_arrays_and_the_step_compiles_once(runs):
  results, smoke = runs
  for shape in MESHES:
    _, _, state, step = results[shape]
    assert step._cache_size() == 1, shape  # pylint: disable=protected-access  (4 calls, one program)
    fsdp, split = shape[1], 0
    for leaf in jax.tree.leaves(state):
      pieces = {s.data.nbytes for s in leaf.addressable_shards}
      if 'fsdp' in leaf.sharding.spec and fsdp > 1:
        assert pieces == {leaf.nbytes // fsdp}, (shape, leaf.shape, leaf.sharding.spec)
        split += leaf.nbytes
      else:
        assert pieces == {leaf.nbytes}, (shape, leaf.shape)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    if fsdp > 1:  # nearly all the state's bytes are in split arrays
      assert split > 0.9 * total, (shape, split, total)
    per_device = sharding.bytes_per_device(state)
    assert len(per_device) == 8 and max(per_device.values()) == pytest.approx(
        total - split + split / fsdp, rel=1e-9), shape
  del smoke


@pytest.mark.pod
def test_a_checkpoint_saved_on_one_mesh_restores_exactly_on_others(runs, tmp_path):
  results, smoke = runs
  saved = results[(2, 4, 1)][2]
  with rundir.manager(tmp_path / 'checkpoints', create=True) as mgr:
    mgr.save(STEPS, args=ocp.args.StandardSave(saved))
    mgr.wait_until_finished()
  expected = jax.device_get(saved)
  for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
    config = _config(smoke, shape)
    mesh = sharding.make_mesh(config)
    target, shardings = state_lib.sharded_shapes(config, state_lib.create_model(config)[1], mesh)
    with rundir.manager(tmp_path / 'checkpoints') as mgr:
      restored = rundir.restore(mgr, STEPS, target)
    assert [x.sharding for x in jax.tree.leaves(restored)] == jax.tree.leaves(shardings)
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(got, want)


def _live_bytes_per_device():
  gc.collect()
  out = {d.id: 0 for d in jax.devices()}
  for array in jax.live_arrays():
    for shard in array.addressable_shards:
      out[shard.device.id] += shard.data.nbytes
  return out


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1)])
def test_init_leaves_no_second_copy_of_the_state_on_any_device(smoke_config, shape, tmp_path):
  """Fresh, and with weights loaded into it (a trunk written from a fresh state, as export_trunk does)."""
  config = _config(smoke_config, shape)
  model = state_lib.create_model(config)[1]
  fresh = jax.device_get(state_lib.initial_state(config, model))
  import flax  # pylint: disable=g-import-not-at-top
  trunk = tmp_path / 'trunk.msgpack'
  trunk.write_bytes(flax.serialization.msgpack_serialize(
      {'params': fresh.params, 'batch_stats': fresh.batch_stats}))
  config.model.trunk_init = str(trunk)
  config.model.trunk_modules = ('backbone', 'csfa', 'decoder')
  before = _live_bytes_per_device()
  state = state_lib.initial_state(config, model)
  after = _live_bytes_per_device()
  grown = {d: after[d] - before[d] for d in after}
  assert grown == sharding.bytes_per_device(state), grown
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), fresh.params)
