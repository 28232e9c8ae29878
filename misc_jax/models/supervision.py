"""The keypoint supervision every model shares: the points that supervise a pair (keypoints, and the dense
points where a dataset has them), the target instance a prediction answers, and the point losses on a score
volume (the match cross-entropy, part classification).

In a multi-instance image every target instance of the category is a correct answer (REFERENCE.md section
1), so each prediction is scored against the target instance it is closest to (mean error over the
keypoints valid in both); with one instance per image (SPair-71k, PF-PASCAL, PF-WILLOW) this is the
standard protocol. Training transfers every annotated source instance; evaluation, source instance 0.
"""

import jax
import jax.numpy as jnp

from misc_jax.ops import correlation
from misc_jax.ops import grid as grids
from misc_jax.ops import soft_argmax


def part_loss(logits, batch, grid: grids.Grid):
  """Part classification: the cross-entropy of every supervised point's class (category x point slot:
  the same part of the same category in any image shares it) against the logits [2B, H, W, C] read at the
  point (bilinear), averaged over the points of the batch. It asks each cell's tokens to say which part
  they show, which the correlation of two images' tokens then matches; the pairwise loss alone learns
  that slowly from scratch (docs/training.md)."""
  sides = [training_points(batch[name]) for name in ('source', 'target')]
  points = jnp.concatenate([p for p, _ in sides])  # [2B, I, N, 2]
  valid = jnp.concatenate([v for _, v in sides])  # [2B, I, N]
  b2, i, n, _ = points.shape
  category = jnp.concatenate([batch['category']] * 2)  # [2B]
  label = category[:, None, None] * n + jnp.arange(n)  # [2B, 1, N]: the class of slot n
  at = soft_argmax.interpolate_at_cells(logits, grid.to_cells(points.reshape(b2, i * n, 2)),
                                        valid.reshape(b2, i * n))  # [2B, I N, C]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(at), jnp.broadcast_to(label, (b2, i, n)).reshape(
      b2, i * n, 1), -1)[..., 0]
  valid = valid.reshape(b2, i * n)
  return (nll * valid).sum() / jnp.maximum(valid.sum(), 1)


def training_points(side):
  """One side's supervised points [B, I, N, 2] and mask [B, I, N]: its keypoints, then its dense points
  when the batch has them."""
  points, valid = [side['keypoints']], [side['keypoint_valid']]
  if 'dense_points' in side:
    points.append(side['dense_points'])
    valid.append(side['dense_valid'])
  valid = jnp.concatenate(valid, -1) & side['instance_valid'][..., None]
  return jnp.concatenate(points, -2), valid


def instance_targets(batch):
  """A batch (input_pipeline layout, one device) -> source keypoints [B, K, 2] and their mask [B, K];
  target keypoints [B, I, K, 2], mask [B, I, K] (valid in both images) and boxes [B, I, 4]."""
  src, trg = batch['source'], batch['target']
  src_valid = annotated(src)[:, 0]
  valid = src_valid[:, None] & annotated(trg)
  return src['keypoints'][:, 0], src_valid, trg['keypoints'], valid, trg['bboxes']


def annotated(side):
  """One image's keypoint mask [B, I, K]: labelled, on an annotated instance."""
  return side['keypoint_valid'] & side['instance_valid'][..., None]


def take_instance(x, index):
  """x [B, I, ...] at one instance per pair, index [B] -> [B, ...]."""
  return jnp.take_along_axis(x, index.reshape((-1,) + (1,) * (x.ndim - 1)), 1)[:, 0]


def match_instances(pred, trg_kps, valid, image_size: int):
  """pred [B, K, 2] against every target instance [B, I, K, 2] -> (normalised mean error of the closest
  instance [B], its index [B], whether the pair has any valid keypoint [B])."""
  dist = jnp.sqrt(jnp.sum(((pred[:, None] - trg_kps) / image_size)**2, -1) + 1e-12)  # [B, I, K]
  count = valid.sum(-1)
  err = jnp.where(count > 0, (dist * valid).sum(-1) / jnp.maximum(count, 1), jnp.inf)  # [B, I]
  best = jnp.argmin(err, axis=1)
  has_any = count.sum(-1) > 0
  return jnp.where(has_any, jnp.min(err, axis=1), 0.), best, has_any


def cell_targets(points, grid: grids.Grid, hw, mode: str = 'bilinear'):
  """Where points [..., 2] (pixels) fall on an hw grid: four cell indices [..., 4] (row-major) and their
  weights [..., 4]: 'bilinear' spreads a point over the four cells around it, so a distribution that
  matches the weights has its expectation exactly at the point (sub-cell precision); 'nearest' puts all
  the weight on the nearest cell."""
  h, w = hw
  u = jnp.clip(grid.to_cells(points), 0, jnp.array([w - 1, h - 1], jnp.float32))  # (x, y) in cells
  if mode == 'nearest':
    lo, t = jnp.round(u), jnp.zeros_like(u)
  elif mode == 'bilinear':
    lo = jnp.clip(jnp.floor(u), 0, jnp.array([max(w - 2, 0), max(h - 2, 0)]))
    t = u - lo
  else:
    raise ValueError(f'match targets {mode!r}: expected "bilinear" or "nearest"')
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.array([w - 1, h - 1]))
  (x0, y0), (x1, y1), (tx, ty) = jnp.moveaxis(lo, -1, 0), jnp.moveaxis(hi, -1, 0), jnp.moveaxis(t, -1, 0)
  index = jnp.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], -1)
  weight = jnp.stack([(1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty], -1)
  return index, weight


def match_loss(scores, src_kps, src_valid, trg_kps, valid, grid: grids.Grid, beta: float,
               targets: str = 'bilinear'):
  """Cross-entropy of each source point's score row (read at the point) against the target cells of its
  true matches (`cell_targets`), the smallest over the target instances (any of them is a correct answer;
  a soft minimum, -logsumexp(-CE)). Regressing soft-argmax positions alone learns slowly from scratch; this
  term gives every target cell a gradient. Returns the mean over each pair's valid points [B] (0 for a
  pair without any)."""
  vol = correlation.as_volume(scores)
  b, ha, wa, hb, wb = vol.shape
  rows = vol.reshape(b, ha, wa, hb * wb)  # [B, Ha, Wa, Sb]
  logp = jax.nn.log_softmax(soft_argmax.interpolate_at_cells(rows, grid.to_cells(src_kps), src_valid) / beta)
  index, weight = cell_targets(trg_kps, grid, (hb, wb), targets)  # [B, I, K, 4]
  logp = jnp.broadcast_to(logp[:, None], index.shape[:3] + logp.shape[-1:])  # [B, I, K, Sb]
  picked = (jnp.take_along_axis(logp, index, -1) * weight).sum(-1)  # [B, I, K]: minus each instance's CE
  nll = -jax.nn.logsumexp(jnp.where(valid, picked, -jnp.inf), axis=1)  # [B, K]
  any_valid = valid.any(axis=1)
  nll = jnp.where(any_valid, nll, 0.)
  return nll.sum(-1) / jnp.maximum(any_valid.sum(-1), 1)
