"""PCK, the field's keypoint-transfer metric, with validity masks instead of padding.

A predicted keypoint is correct when its distance to the ground truth is <= alpha * threshold, with the
threshold per pair: max(w, h) of the target bbox (SPair-71k, PF-WILLOW), max(H, W) of the (resized) image
(PF-PASCAL), or max(w, h) of the extent of the valid ground-truth keypoints (PF-WILLOW's alternative).
Only valid keypoints count anywhere. The peers slice to n_pts for the metric but let padded keypoints leak
into the keypoint-extent threshold (dhpf issue 3, CATs issue 6), inflating it; here padding never enters.
"""

import jax.numpy as jnp


def bbox_threshold(bboxes):
  """bboxes [..., 4] (x1, y1, x2, y2) -> max(w, h)."""
  return jnp.maximum(bboxes[..., 2] - bboxes[..., 0], bboxes[..., 3] - bboxes[..., 1])


def image_threshold(image_hw, batch_size):
  return jnp.full((batch_size,), max(image_hw), jnp.float32)


def keypoint_extent_threshold(kps, valid):
  """kps [B, N, 2], valid [B, N] -> max(w, h) of the valid keypoints' bounding box."""
  big = jnp.finfo(kps.dtype).max
  lo = jnp.where(valid[..., None], kps, big).min(axis=1)
  hi = jnp.where(valid[..., None], kps, -big).max(axis=1)
  extent = jnp.where(valid.any(axis=1, keepdims=True), hi - lo, 0.)
  return extent.max(axis=-1)


def chm_padded_keypoint_threshold(kps, valid, image_size: int, chm_size: int = 240, pad: float = -2.):
  """CHM's PF-WILLOW threshold, which its published numbers use: max over axes of (max - min) of the
  target keypoints *including* its padding slots, which hold -2 at its 240 px input. So it is
  max(x_max, y_max) + 2 (at 240 px) instead of the valid keypoints' extent: inflated, and easier to meet.
  kps [B, N, 2] in pixels of the image_size input -> [B], in those pixels."""
  big = jnp.finfo(kps.dtype).max
  lo = jnp.minimum(jnp.where(valid[..., None], kps, big).min(axis=1), pad * image_size / chm_size)
  hi = jnp.where(valid[..., None], kps, -big).max(axis=1)
  return jnp.where(valid.any(axis=1), (hi - lo).max(axis=-1), 0.)


def pck(pred, gt, valid, threshold, alphas):
  """pred, gt [B, N, 2]; valid [B, N]; threshold [B]; alphas [A].

  Returns a dict of
    correct    [B, A]  number of correct valid keypoints
    count      [B]     number of valid keypoints
    per_image  [B, A]  correct / count (the peers' convention; 0 where count is 0, see `count`)
  Per-keypoint PCK over a dataset is sum(correct) / sum(count); per-image PCK is the mean of per_image
  over pairs with count > 0.
  """
  alphas = jnp.asarray(alphas, jnp.float32)
  dist = jnp.linalg.norm(pred - gt, axis=-1)  # [B, N]
  hit = dist[..., None] <= threshold[:, None, None] * alphas  # [B, N, A]
  correct = jnp.sum(hit & valid[..., None], axis=1).astype(jnp.float32)
  count = valid.sum(axis=1).astype(jnp.float32)
  per_image = correct / jnp.maximum(count, 1)[:, None]
  return {'correct': correct, 'count': count, 'per_image': per_image}
