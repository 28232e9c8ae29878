"""Properties of misc_jax.ops that the golden files do not pin: gradients, the center-pivot structure,
PCK invariants, and the memory-bounded path."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from misc_jax.ops import conv4d
from misc_jax.ops import correlation
from misc_jax.ops import grid
from misc_jax.ops import pck
from misc_jax.ops import soft_argmax


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(autouse=True)
def _float64():
  jax.config.update('jax_enable_x64', True)  # finite differences need float64
  yield
  jax.config.update('jax_enable_x64', False)


def test_correlation_gradients():
  src, trg = _rand(0, 1, 3, 4, 5).astype(np.float64), _rand(1, 1, 2, 3, 5).astype(np.float64)
  for clamp in (True, False):
    f = lambda a, b, clamp=clamp: correlation.correlation(a, b, clamp=clamp)
    jtu.check_grads(f, (src, trg), order=2, modes=['rev'], atol=1e-4, rtol=1e-4)
  jtu.check_grads(lambda a: correlation.mutual_nn_filter(
      correlation.correlation(a, trg, clamp=False)), (src,), order=1, modes=['rev'])


@pytest.mark.parametrize('loop_grads', [False, True])
def test_center_pivot_conv_gradients(loop_grads):
  """Autodiff's gradients and loop_conv2d's hand-written ones (stride 2 over odd sizes, kernels 3 and 5)."""
  x = _rand(2, 1, 4, 5, 5, 4, 2).astype(np.float64)
  module = conv4d.CenterPivotConv4d(3, (3, 3, 5, 3), (1, 1, 2, 2), loop_grads=loop_grads)
  params = jax.tree.map(lambda p: p.astype(np.float64),
                        module.init(jax.random.key(0), x)['params'])
  jtu.check_grads(lambda p, x: module.apply({'params': p}, x), (params, x), order=1, modes=['rev'])


def test_soft_argmax_gradients():
  corr = _rand(3, 1, 3, 4, 4, 3).astype(np.float64)
  jtu.check_grads(lambda c: soft_argmax.soft_argmax(c, 0.5), (corr,), order=2, modes=['rev'])
  jtu.check_grads(lambda c: soft_argmax.kernel_soft_argmax(c, 2.), (corr,), order=1, modes=['rev'])


@pytest.mark.parametrize('k', [3, 5])
def test_full_conv4d_equals_center_pivot_with_center_pivot_kernel(k):
  """A dense 4D kernel that is zero off the two centre planes computes the center-pivot convolution."""
  x = _rand(4, 2, 5, 6, 4, 7, 3)
  cp = conv4d.CenterPivotConv4d(2, (k,) * 4)
  p = cp.init(jax.random.key(1), x)['params']
  c = k // 2
  dense = np.zeros((k, k, k, k, 3, 2), np.float32)
  dense[:, :, c, c] += np.asarray(p['conv_a']['kernel'])  # source plane, target at the centre
  dense[c, c, :, :] += np.asarray(p['conv_b']['kernel'])  # target plane, source at the centre
  bias = p['conv_a']['bias'] + p['conv_b']['bias']
  full = conv4d.Conv4d(2, k).apply({'params': {'kernel': dense, 'bias': bias}}, x)
  np.testing.assert_allclose(full, cp.apply({'params': p}, x), rtol=1e-5, atol=1e-5)


def _pck_case(draw_n=st.integers(1, 8)):
  return st.tuples(st.integers(1, 4), draw_n, st.integers(0, 2**31 - 1))


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(_pck_case(), st.lists(st.floats(0.01, 0.5), min_size=1, max_size=4))
def test_pck_in_unit_interval_and_monotone_in_alpha(case, alphas):
  b, n, seed = case
  rng = np.random.default_rng(seed)
  gt = rng.uniform(0, 100, (b, n, 2)).astype(np.float32)
  pred = gt + rng.normal(0, 10, (b, n, 2)).astype(np.float32)
  valid = rng.uniform(size=(b, n)) < 0.7
  alphas = np.sort(np.asarray(alphas, np.float32))
  out = pck.pck(pred, gt, valid, pck.keypoint_extent_threshold(gt, valid), alphas)
  per_image = np.asarray(out['per_image'])
  assert ((per_image >= 0) & (per_image <= 1)).all()
  assert (np.diff(per_image, axis=1) >= 0).all()
  np.testing.assert_array_equal(out['count'], valid.sum(1))


@hypothesis.settings(deadline=None, max_examples=25)
@hypothesis.given(_pck_case(), st.integers(1, 6), hnp.arrays(np.float32, 2, elements=st.floats(
    -1e4, 1e4, width=32)))
def test_pck_is_invariant_to_padding(case, pad, pad_value):
  """Appending invalid keypoints with any coordinates changes neither PCK nor the extent threshold."""
  b, n, seed = case
  rng = np.random.default_rng(seed)
  gt = rng.uniform(0, 100, (b, n, 2)).astype(np.float32)
  pred = gt + rng.normal(0, 8, (b, n, 2)).astype(np.float32)
  valid = rng.uniform(size=(b, n)) < 0.8
  padded = lambda x, v: np.concatenate([x, np.broadcast_to(v, (b, pad) + x.shape[2:])], 1)
  gt_p, pred_p = padded(gt, pad_value), padded(pred, -pad_value)
  valid_p = padded(valid, False)
  thres = pck.keypoint_extent_threshold(gt, valid)
  np.testing.assert_array_equal(thres, pck.keypoint_extent_threshold(gt_p, valid_p))
  a = pck.pck(pred, gt, valid, thres, [0.05, 0.1])
  p = pck.pck(pred_p, gt_p, valid_p, thres, [0.05, 0.1])
  for key in a:
    np.testing.assert_array_equal(a[key], p[key])


def test_pck_counts_exact_ties_as_correct():
  gt = np.zeros((1, 2, 2), np.float32)
  pred = np.array([[[3., 4.], [3., 4.01]]], np.float32)  # distances 5 and just over 5
  out = pck.pck(pred, gt, np.ones((1, 2), bool), np.array([50.], np.float32), [0.1])
  np.testing.assert_array_equal(out['correct'], [[1]])


def _chunked(stack, rows):
  """The stack through conv4d.chunked_stack, its input rows sliced from a zero-padded volume in the layout
  chunks are cut in (the unstrided image's dims first), the output laid out back as the stack's."""
  margin = sum(k // 2 for k in stack.kernel_sizes)

  def apply(params, x):
    x = conv4d.unstrided_first(stack.stride_dims, x)
    padded = jnp.pad(x, [(0, 0), (margin, margin)] + [(0, 0)] * 4)
    volume_rows = lambda start, n: jax.lax.dynamic_slice_in_dim(padded, start + margin, n, axis=1)
    out = conv4d.chunked_stack(stack, params, volume_rows, x.shape[1], rows)
    return conv4d.unstrided_first(stack.stride_dims, out)
  return apply


@pytest.mark.parametrize('stride_dims', ['source', 'target'])
def test_chunked_stack_is_identical_and_uses_less_memory(stride_dims):
  # Non-square; the strided image's sides odd, the chunked image's height 8.
  x = _rand(5, 2, 8, 6, 7, 9, 3) if stride_dims == 'target' else _rand(5, 2, 7, 9, 8, 6, 3)
  stack = conv4d.CenterPivotStack((8, 16, 16), (3, 5, 3), (2, 1, 2), groups=4, stride_dims=stride_dims)
  params = stack.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  plain = lambda p, x: stack.apply({'params': p}, x)
  grad = lambda f: jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(jnp.sin(f(p, x))), argnums=(0, 1)))
  np.testing.assert_allclose(_chunked(stack, 2)(params, x), plain(params, x), rtol=1e-5, atol=1e-5)
  (l0, g0), (l1, g1) = grad(plain)(params, x), grad(_chunked(stack, 2))(params, x)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Memory of the parameter gradient (a model differentiates the features the volume is made of, not a
  # materialised volume), compiled at a larger size, not run.
  big = jax.ShapeDtypeStruct((1, 24, 24, 24, 24, 3), jnp.float32)
  temp = lambda f: jax.jit(jax.grad(lambda p, x: jnp.mean(jnp.sin(f(p, x))))).lower(
      params, big).compile().memory_analysis().temp_size_in_bytes
  assert temp(_chunked(stack, 1)) < 0.5 * temp(plain)
  with pytest.raises(ValueError, match='chunk_rows=3 must divide the height 8'):
    _chunked(stack, 3)(params, x)


@pytest.mark.parametrize('stride_dims', ['source', 'target'])
@pytest.mark.parametrize('spatial', [2, 8])
def test_spatial_stack_over_chips_equals_the_whole_volume(stride_dims, spatial):
  """The stack with its volume's rows split over `spatial` of the 8 fake devices (shard_map, halos by
  ppermute, GroupNorm statistics by pmean): outputs and gradients of the whole-volume stack."""
  mesh = jax.make_mesh((8 // spatial, spatial), ('batch', 'spatial'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  b = 8 // spatial
  x = _rand(6, b, 8, 6, 8, 6, 3).astype(np.float32)  # 8 rows: one per chip at spatial 8 (halo 2 needs 2)
  stack = conv4d.CenterPivotStack((8, 16, 16), (3, 3, 3), (2, 1, 2), groups=4, stride_dims=stride_dims)
  params = stack.init(jax.random.key(0), x)['params']
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  rows = jax.sharding.PartitionSpec('batch', 'spatial')

  def split(p, x):
    x = conv4d.unstrided_first(stride_dims, x)
    out = jax.shard_map(lambda p, x: conv4d.spatial_stack(stack, p, x), mesh=mesh,
                        in_specs=(jax.sharding.PartitionSpec(), rows), out_specs=rows)(p, x)
    return conv4d.unstrided_first(stride_dims, out)

  plain = lambda p, x: stack.apply({'params': p}, x)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(jnp.sin(f(p, x))), argnums=(0, 1)))
  np.testing.assert_allclose(jax.jit(split)(params, x), plain(params, x), rtol=1e-5, atol=1e-5)
  (l0, g0), (l1, g1) = loss(plain)(params, x), loss(split)(params, x)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  # The blocks' chips swap halos (collective-permute); no reshape turned into an all-to-all.
  hlo = loss(split).lower(params, x).compile().as_text()
  assert 'collective-permute' in hlo and 'all-to-all' not in hlo
  for a, g in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-7)


def test_center_pivot_conv_refuses_branches_of_different_shapes():
  """Padding 0 on the target dims with a 3-wide kernel: the target branch shrinks them, the source branch
  keeps them. HSNet then sums and squeezes to a 4D tensor; we refuse instead of broadcasting to 6D."""
  x = jnp.ones((1, 5, 5, 5, 5, 2))
  conv = conv4d.CenterPivotConv4d(4, (3, 3, 3, 3), padding=(1, 1, 0, 0))
  with pytest.raises(ValueError, match=r'the source branch gives \(1, 5, 5, 5, 5, 4\) and the target '
                                       r'branch \(1, 5, 5, 3, 3, 4\)'):
    conv.init(jax.random.key(0), x)
  assert conv4d.CenterPivotConv4d(4, (3, 3, 3, 3), (1, 1, 2, 2)).init(jax.random.key(0), x)  # the default


@pytest.mark.parametrize('source,target,n_in,n_out', [
    (grid.resnet(16), grid.resnet(8), 8, 16),      # CSFA: layer3 onto the stride-8 grid
    (grid.resnet(32), grid.resnet(8), 4, 16),      # layer4
    (grid.resnet(4), grid.resnet(16), 64, 16),     # the stem onto a stride-16 grid (averaging)
    (grid.Grid(1, 0.5), grid.resnet(8), 128, 16),  # pixels -> cells (mask targets)
    (grid.resnet(8), grid.Grid(1, 0.5), 16, 128),  # cells -> pixels (predicted masks)
    (grid.patches(14), grid.resnet(14), 9, 9),     # ViT patches onto ResNet-style centres
])
def test_resampling_lines_up_cell_centres(source, target, n_in, n_out):
  """A map whose value is the pixel coordinate of each cell's centre resamples to the target cells' own
  centres wherever the target cell lies inside the source's span (outside it, the edge value is held)."""
  ramp = np.asarray(source.centres(n_in))
  x = np.stack(np.meshgrid(ramp, ramp, indexing='ij'), -1)[None]  # [1, n, n, 2]: (y, x) of each centre
  out = np.asarray(grid.resample(jnp.asarray(x), (1, 2), source, target, (n_out, n_out)))
  want = np.asarray(target.centres(n_out))
  margin = 0 if target.stride <= source.stride else target.stride  # the averaging window, when coarser
  inside = (want >= ramp[0] + margin - 1e-6) & (want <= ramp[-1] - margin + 1e-6)
  assert inside.sum() >= n_out // 2
  np.testing.assert_allclose(out[0, inside][:, inside, 0], want[inside][:, None].repeat(inside.sum(), 1),
                             atol=1e-3)
  np.testing.assert_allclose(out[0][inside][:, inside, 1], want[inside][None].repeat(inside.sum(), 0),
                             atol=1e-3)


def test_chms_padded_pf_willow_threshold_is_reproduced():
  """CHM pads target keypoints to 40 slots with -2 (at its 240 px input) and takes max(max - min) over all
  slots; ours gives the same number, and the valid keypoints' extent is smaller."""
  rng = np.random.default_rng(0)
  kps = rng.uniform(20, 200, (3, 10, 2)).astype(np.float32)
  valid = np.ones((3, 10), bool)
  padded = np.concatenate([kps.transpose(0, 2, 1), np.full((3, 2, 30), -2., np.float32)], -1)  # [B, 2, 40]
  chm = np.max(padded.max(2) - padded.min(2), axis=1)  # CHM's PFWillowDataset.get_pckthres
  np.testing.assert_allclose(pck.chm_padded_keypoint_threshold(kps, valid, 240), chm, rtol=1e-6)
  assert (pck.keypoint_extent_threshold(kps, valid) < chm).all()
