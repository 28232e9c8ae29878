"""Parity of misc_jax.ops with the reference implementations (HSNet, NC-Net, CHM, CATs), through the golden
files copied from shared/golden (see its README for the exact semantics of each case)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from misc_jax.ops import conv4d
from misc_jax.ops import correlation
from misc_jax.ops import pck
from misc_jax.ops import soft_argmax

GOLDEN = os.path.join(os.path.dirname(__file__), 'testdata', 'golden')
TOL = dict(rtol=1e-5, atol=1e-5)


def golden(name):
  return dict(np.load(os.path.join(GOLDEN, name + '.npz')))


def nchw_to_nhwc(x):
  return np.moveaxis(x, 1, -1)


def kps_2n_to_n2(x):
  return np.swapaxes(x, 1, 2)


def oihw_to_hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


@pytest.mark.parametrize('name', ['cpconv4d_k3s1', 'cpconv4d_k3s2', 'cpconv4d_k5s1_nonsquare'])
def test_center_pivot_conv4d(name):
  d = golden(name)
  module = conv4d.CenterPivotConv4d(int(d['out_channels']), tuple(d['kernel_size']),
                                    tuple(d['stride']), tuple(d['padding']))
  params = {'conv_a': {'kernel': oihw_to_hwio(d['conv1_weight']), 'bias': d['conv1_bias']},
            'conv_b': {'kernel': oihw_to_hwio(d['conv2_weight']), 'bias': d['conv2_bias']}}
  y = jax.jit(module.apply)({'params': params}, nchw_to_nhwc(d['x']))
  np.testing.assert_allclose(y, nchw_to_nhwc(d['y']), **TOL)


def test_ncnet_conv4d():
  d = golden('ncnet_conv4d_k3')
  k = int(d['kernel_size'][0])
  module = conv4d.Conv4d(d['weight'].shape[0], k)
  kernel = np.transpose(d['weight'], (2, 3, 4, 5, 1, 0))  # (O, I, k, k, k, k) -> (k, k, k, k, I, O)
  np.testing.assert_array_equal(np.transpose(d['weight_prepermuted'], (1, 2, 0, 3, 4, 5)), d['weight'])
  y = module.apply({'params': {'kernel': kernel, 'bias': d['bias']}}, nchw_to_nhwc(d['x']))
  np.testing.assert_allclose(y, nchw_to_nhwc(d['y']), **TOL)


def test_hsnet_multilayer_correlation():
  d = golden('hsnet_corr_case1')
  n = int(d['n_layers'])
  src = [nchw_to_nhwc(d[f'query_feat_{i}']) for i in range(n)]
  trg = [nchw_to_nhwc(d[f'support_feat_{i}']) for i in range(n)]
  groups = jax.jit(correlation.multilayer_correlation, static_argnums=2)(
      src, trg, tuple(int(s) for s in d['stack_ids']))
  for got, key in zip(groups, ['corr_l4', 'corr_l3', 'corr_l2']):
    np.testing.assert_allclose(got, nchw_to_nhwc(d[key]), **TOL)


def test_cats_correlation_and_mutual_nn_filter():
  d = golden('cats_corr_mnn_case1')
  for i in range(3):
    src, trg = nchw_to_nhwc(d[f'src_feat_{i}']), nchw_to_nhwc(d[f'trg_feat_{i}'])
    corr = correlation.correlation(src, trg, clamp=False, eps=1e-6, eps_inside_sqrt=True)
    b, h, w = src.shape[:3]
    np.testing.assert_allclose(corr.reshape(b, h * w, -1), d['corr'][:, i], **TOL)
    mnn = correlation.mutual_nn_filter(corr)
    np.testing.assert_allclose(mnn.reshape(b, h * w, -1), d['corr_mnn'][:, i], **TOL)


@pytest.mark.parametrize('name', ['cats_softargmax_fs8_beta002', 'cats_softargmax_fs8_beta05'])
def test_cats_soft_argmax_and_flow(name):
  d = golden(name)
  fs = int(d['feature_size'])
  corr = d['corr'].reshape(-1, fs, fs, fs, fs)  # (b, ys, xs, yt, xt): source first
  grid = soft_argmax.soft_argmax(jnp.asarray(corr), float(d['beta']))
  np.testing.assert_allclose(grid[..., 0], d['grid_x'][:, 0], **TOL)
  np.testing.assert_allclose(grid[..., 1], d['grid_y'][:, 0], **TOL)
  flow = soft_argmax.grid_to_flow(grid, (fs, fs))
  np.testing.assert_allclose(flow, nchw_to_nhwc(d['flow']), **TOL)


def test_chm_kernel_soft_argmax_and_transfer():
  d = golden('chm_kernel_softargmax_s17')
  b, sa, _ = d['confidence'].shape
  s = int(round(sa**0.5))
  img = int(d['img_size'])
  corr = jnp.asarray(d['confidence'].reshape(b, s, s, s, s))
  coords = soft_argmax.kernel_soft_argmax(corr, float(d['sigma']))
  np.testing.assert_allclose(coords[..., 0].reshape(b, -1), d['prd_x'], **TOL)
  np.testing.assert_allclose(coords[..., 1].reshape(b, -1), d['prd_y'], **TOL)
  n = d['n_pts']
  kps = kps_2n_to_n2(d['src_kps'])
  valid = np.arange(kps.shape[1])[None] < n[:, None]
  kps_norm = soft_argmax.normalize_keypoints(kps, (img, img))
  np.testing.assert_allclose(np.asarray(kps_norm)[valid],
                             kps_2n_to_n2(d['src_kps_normalized'])[valid], **TOL)
  pred = soft_argmax.transfer_keypoints(coords, kps_norm, valid)
  np.testing.assert_allclose(np.asarray(pred)[valid],
                             kps_2n_to_n2(d['prd_kps_normalized'])[valid], **TOL)
  pixels = soft_argmax.unnormalize_keypoints(pred, (img, img))
  np.testing.assert_allclose(np.asarray(pixels)[valid], kps_2n_to_n2(d['prd_kps'])[valid],
                             rtol=1e-5, atol=1e-4)


def test_cats_flow_to_keypoints():
  d = golden('cats_flow2kps_case1')
  kps = kps_2n_to_n2(d['trg_kps'])
  valid = np.arange(kps.shape[1])[None] < d['n_pts'][:, None]
  est = soft_argmax.flow_to_keypoints(jnp.asarray(nchw_to_nhwc(d['flow'])), kps, valid,
                                      tuple(int(v) for v in d['upsample_size']))
  np.testing.assert_allclose(np.asarray(est)[valid], kps_2n_to_n2(d['src_kps_est'])[valid], **TOL)


@pytest.mark.parametrize('name,threshold_key', [('chm_pck_spair_bbox', 'trg_bbox'),
                                                ('chm_pck_pfpascal_img', 'img_hw')])
def test_chm_pck(name, threshold_key):
  d = golden(name)
  pred, gt = kps_2n_to_n2(d['prd_kps']), kps_2n_to_n2(d['trg_kps'])
  valid = np.arange(gt.shape[1])[None] < d['n_pts'][:, None]
  if threshold_key == 'trg_bbox':
    thres = pck.bbox_threshold(jnp.asarray(d['trg_bbox']))
  else:
    thres = pck.image_threshold(tuple(d['img_hw']), len(gt))
  np.testing.assert_allclose(thres, d['pckthres'], **TOL)
  out = pck.pck(pred, gt, valid, thres, d['alpha'])
  np.testing.assert_allclose(out['per_image'], d['pck'], atol=1e-6)
  np.testing.assert_array_equal(out['count'], d['n_pts'])


def test_cats_pck_image_threshold():
  d = golden('cats_pck_pfpascal_img')
  pred, gt = kps_2n_to_n2(d['prd_kps']), kps_2n_to_n2(d['src_kps'])
  valid = np.arange(gt.shape[1])[None] < d['n_pts'][:, None]
  thres = pck.image_threshold(tuple(d['img_hw']), len(gt))
  np.testing.assert_allclose(thres, d['pckthres'], **TOL)
  out = pck.pck(pred, gt, valid, thres, d['alpha'])
  np.testing.assert_allclose(100 * np.asarray(out['per_image']).T, d['pck'], atol=1e-4)
