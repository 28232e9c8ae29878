"""KBCNet: shapes and sizes, coordinate conventions through an identity volume, and overfitting a batch."""

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from misc_jax import input_pipeline
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax.evaluators import pck as pck_evaluator
from misc_jax.models import kbcnet
from misc_jax.models import supervision
from misc_jax.ops import grid as grids


def _model(variant='kbcnet_tiny', **fields):
  """KBCNet from a config's model fields (configs/common.py), with `fields` changed."""
  model_config = common.kbcnet_config(variant, 'synthetic_misc/tiny', 64).model
  model_config.update(fields)
  return kbcnet.from_config(model_config)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_tiny_variant_shapes_and_parameter_count():
  """kbcnet_tiny: 551,317 parameters; scores [B, (S/8)^2, S/8, S/8] for every input size."""
  model = _model(decoder_stride_dims='target')
  image = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  assert _num_params(variables['params']) == 551_317
  for size in (64, 96):
    image = jnp.zeros((2, size, size, 3), jnp.uint8)
    scores = jax.eval_shape(model.apply, variables, image, image)
    n = size // 8
    assert scores.shape == (2, n * n, n, n) and scores.dtype == jnp.float32


def test_initial_scores_are_the_mean_token_cosine():
  """At initialisation a cell's scores are the mean over scales of its tokens' cosines (the decoder's part
  starts at zero): an image against itself scores 1 at the same cell and at most 1 elsewhere."""
  model = _model(decoder_stride_dims='target')
  image = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)), jnp.uint8)
  scores = model.apply(model.init(jax.random.key(0), image, image), image, image)  # [1, 64, 8, 8]
  flat = np.asarray(scores).reshape(64, 64)
  np.testing.assert_allclose(np.diag(flat), 1, atol=1e-3)
  assert flat.max() <= 1 + 1e-3


def test_token_correlation_keeps_negative_cosines():
  """HSNet clamps its correlation at 0 (its features follow a ReLU); signed CSFA tokens must not be."""
  tokens = jax.random.normal(jax.random.key(0), (1, 3, 3, 2, 8))
  corr = kbcnet.correlate_tokens(tokens, -tokens)  # [1, 3, 3, 3, 3, 2]
  same_cell = np.asarray(corr).reshape(9, 9, 2)[np.arange(9), np.arange(9)]
  np.testing.assert_allclose(same_cell, -1, atol=1e-4)


@pytest.mark.parametrize('variant,count', [('kbcnet_r50', 24_267_749), ('kbcnet_r101', 43_259_877)])
def test_full_variants_initialise_from_shapes_in_seconds(variant, count):
  """kbcnet_r50: 24,267,749 parameters; kbcnet_r101: 43,259,877 (ResNet-101 without fc: 42.5M)."""
  model = _model(variant, decoder_stride_dims='target')
  image = jax.ShapeDtypeStruct((2, 240, 240, 3), jnp.uint8)
  start = time.perf_counter()
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  scores = jax.eval_shape(model.apply, variables, image, image)
  assert time.perf_counter() - start < 20
  assert _num_params(variables['params']) == count
  assert scores.shape == (2, 30 * 30, 30, 30)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="unknown KBCNet variant 'kbcnet_r18'"):
    kbcnet.decode_variant('kbcnet_r18')


@pytest.mark.parametrize('grid', [2, 4, 8, 15, 30])
@pytest.mark.parametrize('transfer', ['soft_argmax', 'kernel_soft_argmax', 'local_soft_argmax'])
def test_identity_volume_returns_keypoints_where_they_started(grid, transfer):
  """Identical images: a one-hot volume (each source cell on its own target cell) maps every keypoint,
  anywhere in the image, to itself, at every feature resolution."""
  size = 8 * grid
  eye = jnp.eye(grid * grid).reshape(1, grid * grid, grid, grid)
  kps = np.random.default_rng(grid).uniform(0, size, (1, 20, 2)).astype(np.float32)
  valid = np.ones((1, 20), bool)
  valid[0, -1] = False
  pred = kbcnet.predict_keypoints(eye, kps, valid, size, grid=grids.resnet(8), transfer=transfer,
                                  beta=0.01)
  np.testing.assert_allclose(pred[valid], kps[valid], atol=1e-3)
  np.testing.assert_array_equal(pred[0, -1], kps[0, -1])  # invalid: unchanged


def test_training_loss_transfers_every_annotated_source_instance():
  """Identity scores, two source instances: instance 0 sits on target instance 1 (transfer error 0),
  instance 1 lies 11 px or more off every target instance. The loss is the pair's mean over annotated source
  instances; an unannotated instance adds nothing."""
  grid, size = 4, 32
  config = ml_collections.ConfigDict(dict(
      input=dict(image_size=size),
      model=dict(transfer='soft_argmax', beta=1e-3, sigma=5., match_loss_weight=0., feature_stride=8,
                 match_targets='nearest', transfer_loss_weight=1.)))
  scores = jnp.eye(grid * grid).reshape(1, grid * grid, grid, grid)
  centre = lambda i, j: [8. * i + 0.5, 8. * j + 0.5]  # a cell centre, x then y
  source = {'keypoints': np.array([[[centre(0, 0), centre(1, 2)], [centre(3, 3), centre(2, 0)]]]),
            'keypoint_valid': np.ones((1, 2, 2), bool), 'instance_valid': np.ones((1, 2), bool),
            'image': None}
  target = {'keypoints': np.array([[[centre(2, 2), centre(3, 2)], [centre(0, 0), centre(1, 2)]]]),
            'keypoint_valid': np.ones((1, 2, 2), bool), 'instance_valid': np.ones((1, 2), bool),
            'image': None}
  loss = lambda src: float(kbcnet.train_loss(lambda *_: scores, {'source': src, 'target': target},
                                             config)[1]['transfer_loss'])
  # Instance 1's keypoints (28, 28) and (20, 4) stay where they are; the closest target instance is 0,
  # at (20, 20) and (28, 20): errors of hypot(8, 8) and hypot(8, 16) px, in image sides.
  off = (np.hypot(8, 8) + np.hypot(8, 16)) / 2 / size
  np.testing.assert_allclose(loss(source), off / 2, atol=1e-4)
  np.testing.assert_allclose(loss(dict(source, instance_valid=np.array([[True, False]]))), 0., atol=1e-4)


def test_training_loss_keeps_the_whole_image_soft_argmax_whatever_the_prediction_rule():
  """model.transfer is how predictions are made; the loss's regression term always uses the whole-image
  soft-argmax (its gradient reaches every target cell; see docs/training.md)."""
  grid, size = 4, 32
  scores = jax.random.normal(jax.random.key(0), (1, grid * grid, grid, grid))
  kps = np.array([[[4., 4.], [20., 12.]]], np.float32)
  valid = np.ones((1, 2), bool)
  side = lambda k: {'keypoints': k[:, None], 'keypoint_valid': valid[:, None],
                    'instance_valid': np.ones((1, 1), bool), 'image': None}
  batch = {'source': side(kps), 'target': side(kps[:, ::-1])}
  config = lambda transfer: ml_collections.ConfigDict(dict(
      input=dict(image_size=size),
      model=dict(transfer=transfer, beta=0.5, sigma=1., match_loss_weight=0.1, feature_stride=8,
                 match_targets='nearest', transfer_loss_weight=1.)))
  loss = lambda transfer: kbcnet.train_loss(lambda *_: scores, batch, config(transfer))[0]
  predict = lambda transfer: kbcnet.predict_keypoints(scores, kps, valid, size, grid=grids.resnet(8),
                                                      transfer=transfer,
                                                      beta=0.5, sigma=1.)
  assert np.abs(predict('soft_argmax') - predict('kernel_soft_argmax')).max() > 1  # the rules differ here
  np.testing.assert_array_equal(loss('kernel_soft_argmax'), loss('soft_argmax'))


def test_bfloat16_compute_keeps_float32_params_and_scores():
  image = jnp.full((1, 64, 64, 3), 128, jnp.uint8)
  f32 = _model()
  variables = f32.init(jax.random.key(0), image, image)
  scores = _model(dtype='bfloat16').apply(variables, image, image)
  assert {x.dtype for x in jax.tree.leaves(variables['params'])} == {jnp.dtype('float32')}
  assert scores.dtype == jnp.float32
  reference = f32.apply(variables, image, image)
  np.testing.assert_allclose(scores, reference, atol=0.1 * float(jnp.abs(reference).max()))


def test_overfits_one_batch(smoke_config):
  """~60 AdamW steps on one batch of 8 tiny pairs: the loss falls by a large factor and the batch's
  PCK@0.1 approaches 100%; this fails when gradients, masks or coordinate maps are wrong."""
  config = smoke_config
  steps = 60
  with config.unlocked():
    # The schedule of a longer run, so the learning rate stays high over the 60 steps (decayed to 1% by
    # step 60, the batch's PCK@0.1 stopped at 0.875 on this machine; it reaches 0.95 here).
    config.total_steps = 200
    config.optim.warmup_steps = 1
    config.optim.lr = config.optim.backbone_lr = 3e-3
    config.input.augment.photometric = False
    config.eval.threshold = 'image'
  mesh = sharding.make_mesh(config)
  batch = sharding.global_batch(mesh, next(input_pipeline.train_iterator(config, steps_per_batch=1)),
                               stacked=True)  # one step of 8 pairs, 1 a device
  model_module, model = state_lib.create_model(config)
  state = state_lib.initial_state(config, model, mesh)
  step = train.compile_step(config, model_module, mesh, jax.tree.map(lambda x: x.sharding, state))
  eval_step = jax.jit(functools.partial(pck_evaluator.eval_step, model_module=model_module,
                                        config=config, num_categories=5))
  losses = []
  for _ in range(steps):
    state, metrics, _ = step(state, batch, jax.random.key(0), sharding.flags(mesh, False))
    losses.append(float(metrics['loss'][0]))
  sums, _ = eval_step(state, jax.tree.map(lambda x: x[0], batch))
  pck_01 = float(sums['per_image'][1] / sums['pairs'])
  assert losses[-1] < losses[0] / 5, losses
  assert pck_01 > 0.9, (pck_01, losses)


@pytest.mark.parametrize('path,stride_dims', [('chunks', 'source'), ('chunks', 'target'),
                                              ('spatial', 'source')])
def test_chunked_or_spatial_decoder_gives_the_same_scores_and_gradients(path, stride_dims):
  """decoder_chunk_rows computes the correlation, decoder and heads a few rows at a time, and a mesh with
  a `spatial` axis splits those rows over chips: rows of the target with the default source-strided
  decoder, of the source with a target-strided one."""
  plain = _model(decoder_stride_dims=stride_dims)
  split = _model(decoder_stride_dims=stride_dims, decoder_chunk_rows=2 if path == 'chunks' else 0)
  rng = np.random.default_rng(0)
  source, target = (jnp.asarray(rng.integers(0, 256, (2, 48, 48, 3)), jnp.uint8) for _ in range(2))
  params = plain.init(jax.random.key(0), source, target)['params']
  assert jax.tree.structure(params) == jax.tree.structure(
      split.init(jax.random.key(0), source, target)['params'])
  # A refine head past initialisation: at its zero start the decoder would get no gradient to compare.
  head = params['refine_head']
  params = {**params, 'refine_head': {**head, 'kernel': jnp.full_like(head['kernel'], 0.5)}}
  loss = lambda model: jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(jnp.tanh(model.apply({'params': p}, source, target)))))
  (l0, g0) = loss(plain)(params)
  mesh = jax.make_mesh((2, 1, 2), sharding.AXES, devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)  # 2 pairs, each over 2 chips
  with jax.set_mesh(mesh) if path == 'spatial' else contextlib.nullcontext():
    (l1, g1) = loss(split)(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_bilinear_cell_targets_have_their_expectation_at_the_point():
  grid, hw = grids.resnet(8), (16, 16)
  points = np.random.default_rng(0).uniform(0.5, 120.5, (50, 2)).astype(np.float32)  # inside the centres
  index, weight = supervision.cell_targets(points, grid, hw)
  centres = np.stack(np.meshgrid(grid.centres(16), grid.centres(16), indexing='xy'), -1).reshape(-1, 2)
  np.testing.assert_allclose((weight[..., None] * centres[index]).sum(1), points, atol=1e-3)
  np.testing.assert_allclose(weight.sum(-1), 1, atol=1e-6)
  index, weight = supervision.cell_targets(points, grid, hw, 'nearest')
  nearest = np.argmin(np.linalg.norm(centres[None] - points[:, None], axis=-1), -1)
  np.testing.assert_array_equal(index[:, 0], nearest)
  np.testing.assert_array_equal(weight[:, 0], 1)


def test_match_loss_is_the_cross_entropy_of_the_closest_instance():
  """Scores whose softmax is exactly instance 1's bilinear targets: the loss is those targets' entropy,
  its minimum, whatever instance 0 (elsewhere) does; scores aimed at neither cost more."""
  grid, hw, beta = grids.resnet(8), (4, 4), 0.1
  src = np.array([[[12.3, 9.1]]], np.float32)  # one source point [B, K, 2]
  trg = np.array([[[[4.5, 20.0]], [[13.7, 17.2]]]], np.float32)  # two target instances [B, I, K, 2]
  valid = np.ones((1, 2, 1), bool)
  index, weight = supervision.cell_targets(trg[0, 1, 0], grid, hw)
  probs = np.full(16, 1e-9)
  probs[np.asarray(index)] = weight
  scores = np.broadcast_to(beta * np.log(probs), (1, 16, 16)).reshape(1, 16, 4, 4)  # every source row
  loss = supervision.match_loss(scores, src, np.ones((1, 1), bool), trg, valid, grid, beta)
  entropy = -(weight * np.log(weight)).sum()
  np.testing.assert_allclose(loss, [entropy], rtol=1e-3)
  shifted = np.roll(scores, 5, axis=-1)
  shifted_loss = supervision.match_loss(shifted, src, np.ones((1, 1), bool), trg, valid, grid, beta)
  assert float(shifted_loss[0]) > entropy + 1


def test_hyperpixel_sets_choose_the_backbone_blocks_that_are_correlated():
  from misc_jax.models import resnet  # pylint: disable=g-import-not-at-top
  r101 = resnet.STAGE_SIZES['resnet101']
  assert resnet.hyperpixel_ids('cats', r101) == (0, 8, 20, 21, 26, 28, 29, 30)
  assert resnet.hyperpixel_strides((0, 8, 31), r101) == (4, 16, 32)
  assert resnet.hyperpixel_ids('last', r101) == (7, 30, 33)
  assert len(resnet.hyperpixel_ids('hsnet', r101)) == 30
  with pytest.raises(ValueError, match=r'indices must lie in 0..33'):
    resnet.hyperpixel_ids((3, 40), r101)
  image = jax.ShapeDtypeStruct((1, 240, 240, 3), jnp.uint8)
  model = _model('kbcnet_r101', hyperpixels='cats', feature_stride=16)
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  assert len([k for k in variables['params']['csfa'] if k.startswith('proj')]) == 8  # one token each
  decoder_in = variables['params']['decoder']['block0']['CenterPivotConv4d_0']['conv_a']['kernel']
  assert decoder_in.shape[2] == 8  # eight correlation channels


@pytest.mark.parametrize('stride_dims,decoded', [('source', (1, 4, 4, 16, 16)),
                                                 ('target', (1, 16, 16, 4, 4))])
def test_the_decoder_strides_one_side_and_the_scores_keep_both_grids(stride_dims, decoded):
  """HSNet's choice ('source'): the source dims are strided, the target (where keypoints land) keeps its
  16 x 16 grid; the scores are full size either way."""
  model = _model(decoder_stride_dims=stride_dims)
  image = jnp.zeros((1, 128, 128, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  out, state = jax.eval_shape(lambda v: model.apply(v, image, image, capture_intermediates=True), variables)
  assert out.shape == (1, 256, 16, 16)
  assert state['intermediates']['decoder']['__call__'][0].shape[:5] == decoded


def test_local_soft_argmax_ignores_a_constant_and_keeps_one_of_two_modes():
  """Adding a constant to the scores (which the softmax and the loss ignore) leaves the local soft-argmax
  unchanged, while it moves CHM's kernel soft-argmax; of two equal far-apart modes it returns one, not
  the point between them."""
  from misc_jax.ops import soft_argmax  # pylint: disable=g-import-not-at-top
  corr = np.asarray(jax.random.normal(jax.random.key(0), (1, 2, 2, 12, 12)))
  local = soft_argmax.local_soft_argmax(corr, 0.5, 1.5)
  np.testing.assert_allclose(soft_argmax.local_soft_argmax(corr - 3, 0.5, 1.5), local, atol=1e-4)
  kernel = soft_argmax.kernel_soft_argmax(corr / 0.5, 1.5)
  assert np.abs(soft_argmax.kernel_soft_argmax((corr - 3) / 0.5, 1.5) - kernel).max() > 0.05
  two = np.zeros((1, 1, 1, 12, 12), np.float32)
  two[..., 2, 2] = two[..., 9, 9] = 1
  xy = np.asarray(soft_argmax.local_soft_argmax(two, 0.05, 1.5, (np.arange(12.), np.arange(12.))))[0, 0, 0]
  assert min(np.abs(xy - 2).max(), np.abs(xy - 9).max()) < 0.01, xy


def test_keypoint_argmax_and_window_keep_one_of_two_symmetric_modes():
  """A source keypoint whose target scores have two equal modes (a left/right symmetric part): the
  whole-image soft-argmax lands between them, the DINOv2 line's argmax on one of them, and the windowed
  soft-argmax within its window of that one. On an identity volume, keypoints at cell centres map to
  themselves through both."""
  grid, size = grids.resnet(8), 96  # 12 x 12 cells
  scores = np.zeros((1, 144, 12, 12), np.float32)
  scores[0, :, 5, 1] = scores[0, :, 5, 10] = 1.  # every source cell: two modes, at x cells 1 and 10
  scores[0, :, 4, 1] = 0.5  # a shoulder beside the first mode, inside its window
  kps, valid = np.array([[[44., 44.]]], np.float32), np.ones((1, 1), bool)
  predict = lambda transfer: np.asarray(kbcnet.predict_keypoints(scores, kps, valid, size, grid=grid,
                                                                 transfer=transfer, beta=0.1, window=1.5))
  modes = np.asarray(grid.centres(12))[[1, 10]]  # pixel x of the two modes (y: cell 5)
  whole = predict('soft_argmax')[0, 0]
  assert abs(whole[0] - modes.mean()) < 1  # between the two
  np.testing.assert_allclose(predict('argmax')[0, 0], [modes[0], grid.centres(12)[5]])
  windowed = predict('windowed_soft_argmax')[0, 0]
  assert abs(windowed[0] - modes[0]) < 1e-3 and grid.centres(12)[4] < windowed[1] < grid.centres(12)[5]
  eye = jnp.eye(144).reshape(1, 144, 12, 12)
  centres = np.asarray(grid.centres(12))[np.random.default_rng(0).integers(0, 12, (1, 10, 2))]
  for transfer in ('argmax', 'windowed_soft_argmax'):
    out = kbcnet.predict_keypoints(eye, centres, np.ones((1, 10), bool), size, grid=grid, transfer=transfer,
                                   beta=0.01)
    np.testing.assert_allclose(out, centres, atol=1e-3)


def test_refinement_lands_on_the_fine_cell_that_matches():
  """Identical images whose fine descriptors are near-orthogonal per cell: keypoints at fine-cell centres,
  coarse matches off by up to one coarse cell (8 px = 2 fine cells). The refinement returns the keypoints;
  through predict_keypoints too, after an identity coarse volume."""
  fine_grid, size = grids.resnet(4), 64
  fine = jax.random.normal(jax.random.key(1), (1, 16, 16, 256))
  fine = fine / jnp.linalg.norm(fine, axis=-1, keepdims=True)
  rng = np.random.default_rng(0)
  kps = fine_grid.centres(16)[rng.integers(1, 15, (1, 20, 2))]  # [1, 20, 2] at fine-cell centres
  centres = kps + rng.uniform(-8, 8, kps.shape)
  valid = np.ones((1, 20), bool)
  refined = kbcnet.refine_keypoints(fine, fine, kps, centres, valid, size, grid=fine_grid, radius=3, beta=0.01)
  np.testing.assert_allclose(refined, kps, atol=1e-3)
  eye = jnp.eye(64).reshape(1, 64, 8, 8)
  out = {'scores': eye, 'fine': jnp.concatenate([fine, fine])}
  pred = kbcnet.predict_keypoints(out, kps, valid, size, grid=grids.resnet(8), beta=0.01,
                                  refine=dict(grid=fine_grid, radius=3, beta=0.01))
  np.testing.assert_allclose(pred, kps, atol=1e-3)


def test_the_refinement_stage_reads_the_finest_feature_map():
  """refine_dim > 0: the model also returns unit descriptors on the first hyperpixel's (stride 4) grid."""
  model = _model(refine_dim=8, hyperpixels='1,2,3,4')
  image = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8)
  variables = jax.eval_shape(model.init, jax.random.key(0), image, image)
  out = jax.eval_shape(model.apply, variables, image, image)
  assert out['scores'].shape == (2, 64, 8, 8) and out['fine'].shape == (4, 16, 16, 8)
