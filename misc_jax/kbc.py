"""KBC: keypoint bounding-box-centred cropping (KBCNet, REFERENCE.md section 1).

Keypoints of a small object sit so close on the feature grid that their features fuse. KBC enlarges the
image so that the keypoints' bounding box fills more of the fixed network input and crops a window of the
input size centred on the box. It is model-agnostic and has no parameters.

A crop is the affine map  crop = image * scale - offset  (per pair: scale [B], offset [B, 2] as (x, y)),
on continuous pixel coordinates where the image spans [0, W] x [0, H] (pixel i covers [i, i + 1), the
convention of `jax.image.scale_and_translate` and of our keypoints). Its inverse is exact:
image = (crop + offset) / scale. Scale is never below 1, and the window is clamped inside the enlarged
image, so a crop never shows anything outside the image.

Each image's crop is decided by its own box: when only the source's box is small (or only the target's),
that image is enlarged and the other is left whole. The small object then moves toward the other's size,
where cropping both would enlarge the large one too and keep them further apart
(tests/test_kbc.py::test_only_the_small_side_is_enlarged_which_brings_the_scales_together).

Everything here is jit-compatible with static output shapes.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Crop(NamedTuple):
  scale: jax.Array   # [B]
  offset: jax.Array  # [B, 2] (x, y), in pixels of the enlarged image


def identity(batch: int) -> Crop:
  return Crop(jnp.ones((batch,)), jnp.zeros((batch, 2)))


def keypoint_box(kps, valid):
  """Bounding box [B, 4] (x0, y0, x1, y1) of the valid keypoints [B, N, 2]; all zeros when none is."""
  big = jnp.finfo(jnp.float32).max
  lo = jnp.min(jnp.where(valid[..., None], kps, big), axis=1)
  hi = jnp.max(jnp.where(valid[..., None], kps, -big), axis=1)
  any_valid = valid.any(axis=1, keepdims=True)
  return jnp.where(any_valid, jnp.concatenate([lo, hi], axis=-1), 0.)


def longer_side(box):
  """The longer side [B] of boxes [B, 4] (x0, y0, x1, y1)."""
  return jnp.max(box[:, 2:] - box[:, :2], axis=-1)


def crop_for_box(box, has_box, size: int, *, margin: float, fill: float, max_scale: float,
                 small_threshold: float) -> Crop:
  """The crop that makes `box` [B, 4] (plus `margin` x its longer side on every side) fill a `fill`
  fraction of the `size` x `size` input, at most `max_scale` times enlarged.

  Pairs without a box (`has_box` [B] False) or with a box whose longer side is at least
  `small_threshold` x size (not a small object) get the identity crop.
  """
  side = longer_side(box)
  padded = side * (1 + 2 * margin)
  scale = jnp.clip(fill * size / jnp.maximum(padded, 1e-6), 1., max_scale)
  scale = jnp.where(has_box & (side < small_threshold * size), scale, 1.)
  centre = (box[:, :2] + box[:, 2:]) / 2 * scale[:, None]
  offset = jnp.clip(centre - size / 2, 0., (scale[:, None] - 1) * size)  # window inside the image
  return Crop(scale, offset)


def _per_point(crop: Crop, ndim: int):
  """scale and offset shaped [B, 1, ..., 1, 1] and [B, 1, ..., 2] for points of rank `ndim`."""
  expand = lambda v: v.reshape(v.shape[:1] + (1,) * (ndim - v.ndim) + v.shape[1:])
  return expand(crop.scale[:, None]), expand(crop.offset)


def to_crop(points, crop: Crop):
  """Image pixels [B, ..., 2] -> crop pixels."""
  scale, offset = _per_point(crop, points.ndim)
  return points * scale - offset


def from_crop(points, crop: Crop):
  """Crop pixels [B, ..., 2] -> image pixels (the exact inverse of `to_crop`)."""
  scale, offset = _per_point(crop, points.ndim)
  return (points + offset) / scale


def boxes_to_crop(boxes, crop: Crop):
  """Boxes [B, ..., 4] (x0, y0, x1, y1) -> crop pixels (still boxes: the map is a scale and a shift)."""
  corners = to_crop(boxes.reshape(*boxes.shape[:-1], 2, 2), crop)
  return corners.reshape(boxes.shape)


def resample(images, crop: Crop, size: int | None = None):
  """Images [B, H, W, C] -> the cropped window [B, size, size, C] (default: the images' own size) in their
  dtype (bilinear, averaged where the crop shrinks; integer images are rounded). The crop is in pixels of
  a size x size image: a larger image of the same view (H = f * size, e.g. the stored full-resolution
  one) gives the same window, sharper. Masks: resample as float and threshold at 0.5."""
  size = size or images.shape[1]
  f = images.shape[1] / size  # pixels of `images` per pixel of the size x size image

  def one(image, scale, offset):
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1), jnp.stack([scale, scale]) / f,
        -offset[::-1], method='linear', antialias=True)
  out = jax.vmap(one)(images, crop.scale, crop.offset)
  if jnp.issubdtype(images.dtype, jnp.integer):
    info = jnp.iinfo(images.dtype)
    out = jnp.clip(jnp.round(out), info.min, info.max)
  return out.astype(images.dtype)


def crop_for_config(kps, valid, size: int, kbc_config, max_scale: float | None = None) -> Crop:
  """The crop around the valid keypoints [B, N, 2], with config.kbc's margin, fill, max_scale (unless
  given) and small_threshold."""
  c = kbc_config
  return crop_for_box(keypoint_box(kps, valid), valid.any(-1), size, margin=c.margin, fill=c.fill,
                      max_scale=max_scale or c.max_scale, small_threshold=c.small_threshold)


def agreeing(points, valid, radius):
  """[B, N] bool: the valid points [B, N, 2] within `radius` [B] pixels of their median, or every valid
  one where none is. A coarse pass scatters one instance's keypoints over several target instances and
  wrong parts; the box of the ones that agree frames the instance most of them found."""
  median = jnp.nanmedian(jnp.where(valid[..., None], points, jnp.nan), axis=1)  # [B, 2]
  near = valid & (jnp.linalg.norm(points - median[:, None], axis=-1) < radius[:, None])
  return jnp.where(near.any(1, keepdims=True), near, valid)


def ground_truth_crops(src_kps, src_valid, trg_kps, trg_valid, size: int, kbc_config):
  """Crops for training and figures: around the source keypoints [B, K, 2] and around the ground-truth
  keypoints [B, I, K, 2] of the target instances given (training gives one: train._kbc_crops)."""
  b = src_kps.shape[0]
  return (crop_for_config(src_kps, src_valid, size, kbc_config),
          crop_for_config(trg_kps.reshape(b, -1, 2), trg_valid.reshape(b, -1), size, kbc_config))


def crop_side(side, crop: Crop):
  """One side of a batch (input_pipeline layout: image [B, S, S, 3] uint8, keypoints [B, I, K, 2], bboxes
  [B, I, 4], masks [B, I, S, S] bool, dense_points [B, I, P, 2] if any) -> the same fields seen through the
  crop, the image cut from `image_full` where the side has it (as at evaluation: an enlarged crop keeps the
  stored detail). Points that leave the window are no longer valid (they keep their outside coordinates)."""
  size = side['image'].shape[1]
  masks = resample(side['masks'].astype(jnp.float32).transpose(0, 2, 3, 1), crop) > 0.5
  out = dict(side, image=resample(side.get('image_full', side['image']), crop, size),
             bboxes=boxes_to_crop(side['bboxes'], crop), masks=masks.transpose(0, 3, 1, 2))
  out.pop('image_full', None)
  for points, valid in (('keypoints', 'keypoint_valid'), ('dense_points', 'dense_valid')):
    if points in side:
      out[points] = to_crop(side[points], crop)
      out[valid] = side[valid] & ((out[points] >= 0) & (out[points] <= size)).all(-1)
  return out


def predict(apply, transfer, source, target, src_kps, src_valid, coarse, kbc_config, full=None):
  """KBC at test time: crop both images, predict there, map the predictions back.

  apply(source_images, target_images) -> scores; transfer(scores, kps, valid) -> target keypoints (both
  in the network input's pixels). The source crop comes from the source keypoints [B, K, 2]. The target
  keypoints are unknown at test time: `coarse` (a first pass's predictions on the whole images) places the
  target crop around the box of those that agree (`agreeing`, with kbc.coarse_radius; 0 takes them all);
  None leaves the target image uncropped. With kbc.passes = n > 1 the crops zoom in over n passes, pass i
  enlarging at most kbc.max_scale ** (i / n) around the previous pass's predictions: a target crop that
  the coarse pass placed off its instance is re-centred before the closest view. `full` (source, target):
  the same views at a higher resolution (the input pipeline's `image_full`), which the crops are cut from,
  so an enlarged crop shows the stored image's detail instead of an upsampled blur. Returns target
  keypoints [B, K, 2] in the whole image's pixels (invalid ones unchanged).
  """
  size = source.shape[1]
  source, target = full or (source, target)
  passes, r = kbc_config.get('passes', 1), kbc_config.get('coarse_radius', 0.)
  # kbc.coarse_radius x the source keypoints' box side: the predictions that frame the target crop
  radius = r * longer_side(keypoint_box(src_kps, src_valid)) if r else None  # [B] pixels
  pred = coarse
  for i in range(1, passes + 1):
    max_scale = kbc_config.max_scale ** (i / passes)
    src_crop = crop_for_config(src_kps, src_valid, size, kbc_config, max_scale)
    if pred is None:
      trg_crop = identity(src_kps.shape[0])
    else:  # around the predictions that agree
      box_valid = src_valid if radius is None else agreeing(pred, src_valid, radius)
      trg_crop = crop_for_config(pred, box_valid, size, kbc_config, max_scale)
    scores = apply(resample(source, src_crop, size), resample(target, trg_crop, size))
    pred = jnp.clip(from_crop(transfer(scores, to_crop(src_kps, src_crop), src_valid), trg_crop), 0, size)
    pred = jnp.where(src_valid[..., None], pred, src_kps)
  return pred
