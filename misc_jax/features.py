"""The one feature schema of a correspondence pair, shared by every dataset builder.

Every builder (synthetic_misc, misc210k, spair71k, pf_pascal, pf_willow) emits examples of this form, so the
input pipeline, the models and the evaluators never care which dataset they read:

  pair_id      Text            unique within the dataset, stable across versions
  category     ClassLabel      the category both images share (names are the dataset's own)
  source, target: each a dict with
    image         Image uint8 [H, W, 3], encoded (JPEG or PNG)
    instance_ids  int64 [I]              ids of the annotated instances, unique within the image
    keypoints     float32 [I, K, 2]      (x, y) in pixels of the original image
    keypoint_visible bool [I, K]         True where the keypoint's position is labelled (in a pair
                                          dataset: labelled in both images)
    bboxes        float32 [I, 4]         (x1, y1, x2, y2) in pixels, x2 > x1 and y2 > y1
    masks         Sequence(Image uint8 [H, W, 1], PNG)  one binary mask per instance (0 / 255),
                                          or an empty sequence for datasets without masks
  attributes   dict of int32 scalars  only in datasets that annotate pairs (SPair-71k: viewpoint_variation,
                                      scale_variation, truncation, occlusion, mirror); the evaluator reports
                                      PCK for each value of each attribute
  source/target dense_points float32 [I, P, 2], dense_visible bool [I, P]: only in datasets that know more
               corresponding points than their keypoints (synthetic_misc: points at fixed affine
               combinations of the keypoints); training may use them, evaluation never does

Conventions:
- Coordinates are the dataset's own, unchanged (the peers' PCK uses them so). For the synthetic data they
  are continuous: the image covers [0, W] x [0, H] and the centre of pixel (col i, row j) is
  (i + 0.5, j + 0.5). Resizing by a factor s maps x to s * x (what the peers do for PCK).
- Keypoint index k names the same semantic part in every instance of the category, in both images, so
  keypoint k of any source instance corresponds to keypoint k of every target instance.
- K is fixed per dataset (the category-union keypoint count; unused slots are invisible). The pipeline pads
  I and K to static sizes with validity masks.

`validate_side` is the boundary check every builder runs before it yields an example: a malformed record is
rejected with an error naming the dataset, split, example key and field; nothing is dropped or clipped.
"""

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

SIDES = ('source', 'target')
# A visible keypoint may sit on the image border, but not further outside than this (pixels).
KEYPOINT_BORDER_TOLERANCE = 1.0


class InvalidExampleError(ValueError):
  """A record that breaks the schema; the message names dataset, split, key and field."""


def pair_features(category_names: Sequence[str], attributes: Sequence[str] = (),
                  dense_points: bool = False) -> tfds.features.FeaturesDict:
  """Returns the TFDS features of one correspondence pair (with int `attributes` when given, and dense
  training points when `dense_points`)."""

  def side():
    dense = {'dense_points': tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding='bytes'),
             'dense_visible': tfds.features.Tensor(shape=(None, None), dtype=np.bool_, encoding='bytes')}
    return tfds.features.FeaturesDict({
        **(dense if dense_points else {}),
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'instance_ids': tfds.features.Tensor(shape=(None,), dtype=np.int64),
        'keypoints': tfds.features.Tensor(shape=(None, None, 2), dtype=np.float32, encoding='bytes'),
        'keypoint_visible': tfds.features.Tensor(shape=(None, None), dtype=np.bool_, encoding='bytes'),
        'bboxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        'masks': tfds.features.Sequence(
            tfds.features.Image(shape=(None, None, 1), encoding_format='png')),
    })

  pair = {
      'pair_id': tfds.features.Text(),
      'category': tfds.features.ClassLabel(names=list(category_names)),
      'source': side(),
      'target': side(),
  }
  if attributes:
    pair['attributes'] = tfds.features.FeaturesDict(
        {name: tfds.features.Scalar(dtype=np.int32) for name in attributes})
  return tfds.features.FeaturesDict(pair)


def validate_side(side: dict, *, dataset: str, split: str, key: str, name: str) -> None:
  """Checks one side ('source' or 'target') of a pair before it is written.

  `side['image']` may be an array [H, W, 3] or an image size (H, W); masks, if present, are arrays.
  """

  def fail(field, message):
    raise InvalidExampleError(
        f'{dataset}/{split} example {key!r}: field {name}/{field}: {message}')

  image = side['image']
  height, width = (image.shape[:2] if hasattr(image, 'shape') else image)
  keypoints = np.asarray(side['keypoints'], np.float32)
  visible = np.asarray(side['keypoint_visible'], bool)
  bboxes = np.asarray(side['bboxes'], np.float32)
  ids = np.asarray(side['instance_ids'])
  num = len(ids)
  if num == 0:
    fail('instance_ids', 'no annotated instance')
  if len(np.unique(ids)) != num:
    fail('instance_ids', f'ids are not unique: {ids.tolist()}')
  if keypoints.ndim != 3 or keypoints.shape[0] != num or keypoints.shape[2] != 2:
    fail('keypoints', f'shape {keypoints.shape}, expected [{num}, K, 2]')
  if visible.shape != keypoints.shape[:2]:
    fail('keypoint_visible', f'shape {visible.shape}, expected {keypoints.shape[:2]}')
  if not np.isfinite(keypoints[visible]).all():
    fail('keypoints', 'a visible keypoint is not finite')
  vis_kps = keypoints[visible]
  tol = KEYPOINT_BORDER_TOLERANCE
  outside = ((vis_kps[:, 0] < -tol) | (vis_kps[:, 0] > width + tol) |
             (vis_kps[:, 1] < -tol) | (vis_kps[:, 1] > height + tol))
  if outside.any():
    fail('keypoints', f'visible keypoint {vis_kps[outside][0].tolist()} lies outside the '
                      f'{width}x{height} image')
  if bboxes.shape != (num, 4):
    fail('bboxes', f'shape {bboxes.shape}, expected [{num}, 4]')
  if not np.isfinite(bboxes).all():
    fail('bboxes', 'not finite')
  degenerate = (bboxes[:, 2] <= bboxes[:, 0]) | (bboxes[:, 3] <= bboxes[:, 1])
  if degenerate.any():
    fail('bboxes', f'zero-area box {bboxes[degenerate][0].tolist()} (x1, y1, x2, y2)')
  if 'dense_points' in side:
    dense = np.asarray(side['dense_points'], np.float32)
    if dense.ndim != 3 or dense.shape[0] != num or dense.shape[2] != 2:
      fail('dense_points', f'shape {dense.shape}, expected [{num}, P, 2]')
    if np.asarray(side['dense_visible']).shape != dense.shape[:2]:
      fail('dense_visible', f'shape {np.shape(side["dense_visible"])}, expected {dense.shape[:2]}')
  masks = side.get('masks', [])
  if len(masks) not in (0, num):
    fail('masks', f'{len(masks)} masks for {num} instances')
  for i, mask in enumerate(masks):
    mask = np.asarray(mask)
    if mask.shape[:2] != (height, width):
      fail('masks', f'mask {i} has shape {mask.shape}, image is {height}x{width}')
    if not mask.any():
      fail('masks', f'mask {i} (instance {ids[i]}) is empty')


def validate_pair(example: dict, *, dataset: str, split: str, key: str) -> None:
  """Validates both sides of a pair (see `validate_side`)."""
  for name in SIDES:
    validate_side(example[name], dataset=dataset, split=split, key=key, name=name)
  k_source = np.asarray(example['source']['keypoints']).shape[1]
  k_target = np.asarray(example['target']['keypoints']).shape[1]
  if k_source != k_target:
    raise InvalidExampleError(
        f'{dataset}/{split} example {key!r}: field target/keypoints: {k_target} keypoints per '
        f'instance, the source has {k_source}')
