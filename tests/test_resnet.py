"""The Flax ResNet-101 with converted torchvision weights matches torchvision (shared/golden formula); where
its feature cells sit in the image."""

import os

import jax
import numpy as np
import pytest

import golden_weights
from misc_jax.models import resnet
from misc_jax.ops import grid as grids

GOLDEN = golden_weights.GOLDEN
formula_state_dict = golden_weights.resnet101  # section 10 of shared/golden/README.md


def test_resnet101_matches_torchvision():
  golden = np.load(os.path.join(GOLDEN, 'torchvision_resnet101_features.npz'))
  variables = resnet.torchvision_to_flax(formula_state_dict())
  model = resnet.ResNet(resnet.STAGE_SIZES['resnet101'], num_classes=1000)
  image = np.sin(0.05 * np.arange(3 * 96 * 128)).reshape(1, 3, 96, 128).astype(np.float32)
  out = jax.jit(model.apply)(variables, image.transpose(0, 2, 3, 1))
  nchw = lambda x: np.asarray(x).transpose(0, 3, 1, 2)
  tol = dict(rtol=1e-4, atol=1e-4)
  for key in ('stem', 'layer1', 'layer2', 'layer3', 'layer4'):
    np.testing.assert_allclose(nchw(out[key]), golden[key], err_msg=key, **tol)
  layer3_blocks = out['blocks'][3 + 4:3 + 4 + 23]
  for j, block in enumerate(layer3_blocks):
    np.testing.assert_allclose(nchw(block), golden['layer3_block_outputs'][j], err_msg=f'block {j}',
                               **tol)
  np.testing.assert_allclose(out['logits'], golden['logits'], **tol)


def test_timm_resnet101_weights_convert_and_match_timms_forward_pass(tmp_path):
  """timm's plain resnet101 (resnet101.a1_in1k and the like) shares torchvision's names: the formula
  weights through the converter match timm 1.0.31's own forward pass (make_timm_resnet_golden.py); timm's
  other variants are refused by name."""
  from misc_jax.tools import convert_resnet  # pylint: disable=g-import-not-at-top
  golden = np.load(os.path.join(GOLDEN, 'timm_resnet101_features.npz'))
  np.savez(tmp_path / 'resnet101_a1_in1k.npz', **formula_state_dict())
  variables = convert_resnet.convert(str(tmp_path / 'resnet101_a1_in1k.npz'), str(tmp_path / 'out.msgpack'))
  variables['params']['fc'] = resnet.torchvision_to_flax(formula_state_dict())['params']['fc']
  model = resnet.ResNet(resnet.STAGE_SIZES['resnet101'], num_classes=1000)
  image = np.sin(0.05 * np.arange(3 * 96 * 128)).reshape(1, 3, 96, 128).astype(np.float32)
  out = jax.jit(model.apply)(variables, image.transpose(0, 2, 3, 1))
  for key in ('layer2', 'layer3', 'layer4'):
    np.testing.assert_allclose(np.asarray(out[key]).transpose(0, 3, 1, 2), golden[key], rtol=1e-4, atol=1e-4,
                               err_msg=key)
  np.testing.assert_allclose(out['logits'], golden['logits'], rtol=1e-4, atol=1e-4)
  deep_stem = {'conv1.0.weight': np.zeros((32, 3, 3, 3), np.float32), **formula_state_dict()}
  np.savez(tmp_path / 'resnet101d.npz', **deep_stem)
  with pytest.raises(ValueError, match=r"resnet101d.npz: the key 'conv1.0.weight' belongs to a ResNet with a "
                                       r"deep stem"):
    convert_resnet.convert(str(tmp_path / 'resnet101d.npz'), str(tmp_path / 'd.msgpack'))


def test_a_feature_cell_is_centred_on_pixel_stride_times_its_index():
  """A one-hot input pixel through the real backbone with positive constant weights (every layer then
  linear and symmetric): each stride-s map responds around cell p / s, which ops/grid.py places at
  continuous coordinate s * i + 0.5, the pixel's centre, not at s * (i + 1/2)."""
  model = resnet.ResNet((1, 1, 1, 1), width=8)
  image = np.zeros((1, 256, 256, 3), np.float32)
  variables = model.init(jax.random.key(0), image)
  fan_in = lambda k: np.prod(k.shape[:-1])
  params = jax.tree.map(lambda x: np.full(x.shape, 1 / fan_in(x) if x.ndim == 4 else 1., np.float32),
                        variables['params'])  # kernels 1 / fan-in, BatchNorm scale 1
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if path[-1].key == 'bias' else x, params)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros_like(x) if path[-1].key == 'mean' else np.ones_like(x),
      variables['batch_stats'])
  y, x = 128, 96
  image[0, y, x] = 1.
  out = model.apply({'params': params, 'batch_stats': stats}, image)
  for name, stride in (('stem', 4), ('layer1', 4), ('layer2', 8), ('layer3', 16), ('layer4', 32)):
    response = np.asarray(out[name][0]).sum(-1)  # [h, w]
    rows, cols = np.mgrid[:response.shape[0], :response.shape[1]]
    centroid = np.array([(cols * response).sum(), (rows * response).sum()]) / response.sum()
    expected = grids.resnet(stride).to_cells(np.array([x + 0.5, y + 0.5]))  # the pixel's centre
    np.testing.assert_allclose(centroid, expected, atol=1e-3, err_msg=name)


def test_folded_batchnorm_gives_the_same_features_and_gradients():
  """Frozen BatchNorm folded into the convolutions (the default) against the two as separate passes:
  same variables (checkpoint layout), outputs and gradients equal to float rounding."""
  state = formula_state_dict()
  variables = resnet.torchvision_to_flax(state)
  variables['params'].pop('fc')
  image = np.sin(0.05 * np.arange(3 * 64 * 64)).reshape(1, 64, 64, 3).astype(np.float32)
  folded, plain = (resnet.ResNet(resnet.STAGE_SIZES['resnet101'], fold_batchnorm=f) for f in (True, False))
  assert jax.tree.structure(jax.eval_shape(folded.init, jax.random.key(0), image)) == jax.tree.structure(
      jax.eval_shape(plain.init, jax.random.key(0), image))
  loss = lambda model: jax.jit(jax.value_and_grad(lambda p: (model.apply(
      {'params': p, 'batch_stats': variables['batch_stats']}, image)['layer3'] ** 2).mean()))
  (a, ga), (b, gb) = loss(folded)(variables['params']), loss(plain)(variables['params'])
  np.testing.assert_allclose(a, b, rtol=1e-4)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    # Summation-order noise of the folded convolution depends on the CPU's kernels: elementwise, on an AMD
    # EPYC without AVX-512, up to 10% on gradients near zero (1.6e-7 vs 0.9e-7), so each array is compared
    # as a whole: a wrong fold is off by its own size.
    assert np.linalg.norm(x - y) <= 1e-3 * np.linalg.norm(y), (x.shape, np.linalg.norm(x - y))
