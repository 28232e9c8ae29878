"""spair71k: SPair-71k (Min et al., 2019), one annotated instance per image, 18 PASCAL categories.

Keypoints come from the pair JSON, which lists only the keypoints visible in both images; keypoint id k
(0..29) goes to slot k, so slot k names the same part in every pair of a category. Boxes are the pair's
`src_bndbox`/`trg_bndbox`. The mask is the category's pixels in `Segmentation/<cat>/<name>.png` (which can
include other instances of the category); a file that labels the object with another index gives every
labelled pixel (not 0, not the 255 border). The pair's difficulty annotations are kept as attributes.
"""

import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders import common

CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'dog',
              'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'train', 'tvmonitor')
# Class indices of the PASCAL VOC palette the segmentations use.
_VOC_INDEX = {name: i + 1 for i, name in enumerate((
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow', 'diningtable',
    'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor'))}
NUM_KEYPOINTS = 30
ATTRIBUTES = ('viewpoint_variation', 'scale_variation', 'truncation', 'occlusion', 'mirror')
_SPLITS = {'train': 'trn', 'validation': 'val', 'test': 'test'}

_CITATION = """
@article{min2019spair,
  title={SPair-71k: A Large-scale Benchmark for Semantic Correspondence},
  author={Min, Juhong and Lee, Jongmin and Ponce, Jean and Cho, Minsu},
  journal={arXiv preprint arXiv:1908.10543},
  year={2019}
}
"""


class Builder(common.ManualBuilder):
  """SPair-71k pairs with keypoints, boxes, masks and difficulty attributes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: pair keypoints in 30 slots, masks, difficulty attributes.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='large', description='Layout/large: the standard 53,340 / 5,384 / '
                              '12,234 pairs.'),
      tfds.core.BuilderConfig(name='small', description='Layout/small: the small layout of the release.'),
  ]
  # The official pair counts of each layout's splits (REFERENCE.md); `build` says how many a build lacks.
  OFFICIAL_PAIRS = {'large': {'train': 53_340, 'validation': 5_384, 'test': 12_234}}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download SPair-71k.tar.gz from https://cvlab.postech.ac.kr/research/SPair-71k/ and unpack it; manual_dir
  is the SPair-71k folder, holding JPEGImages/, PairAnnotation/, Segmentation/ and Layout/.
  Then: python -m tfds_builders.build spair71k --manual_dir <path>/SPair-71k
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.pair_features(CATEGORIES, attributes=ATTRIBUTES),
        homepage='https://cvlab.postech.ac.kr/research/SPair-71k/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root = common.manual_path(dl_manager)
    return {split: self._generate_examples(root, split, short) for split, short in _SPLITS.items()}

  def _generate_examples(self, root, split, short):
    layout = os.path.join(root, 'Layout', self.builder_config.name, f'{short}.txt')
    names = common.read_lines(layout)
    jobs = ((name, lambda name=name: _make_pair(
        root, os.path.join(root, 'PairAnnotation', short, f'{name}.json'))) for name in names)
    yield from self.checked_examples(split, jobs)


def _make_pair(root, path) -> dict:
  pair = common.read_json(path)

  def get(field):
    if not isinstance(pair, dict) or field not in pair:
      common.fail(path, field, 'missing')
    return pair[field]

  category = get('category')
  if category not in CATEGORIES:
    common.fail(path, 'category', f'{category!r} is not one of the {len(CATEGORIES)} SPair-71k categories')
  try:
    ids = [int(k) for k in get('kps_ids')]
  except (TypeError, ValueError):
    common.fail(path, 'kps_ids', f'{get("kps_ids")!r} are not keypoint ids')
  if any(not 0 <= k < NUM_KEYPOINTS for k in ids) or len(set(ids)) != len(ids):
    common.fail(path, 'kps_ids', f'{ids} are not distinct ids in 0..{NUM_KEYPOINTS - 1}')
  example = {'category': category, 'attributes': {}}
  for name in ATTRIBUTES:
    try:
      example['attributes'][name] = int(get(name))
    except (TypeError, ValueError):
      common.fail(path, name, f'{get(name)!r} is not an integer')
  for side, prefix in (('source', 'src'), ('target', 'trg')):
    kps = np.asarray(get(f'{prefix}_kps'), np.float32)
    if kps.shape != (len(ids), 2):
      common.fail(path, f'{prefix}_kps', f'shape {kps.shape}, expected [{len(ids)}, 2] (one [x, y] per '
                  'kps_ids entry)')
    keypoints = np.zeros((1, NUM_KEYPOINTS, 2), np.float32)
    visible = np.zeros((1, NUM_KEYPOINTS), bool)
    keypoints[0, ids], visible[0, ids] = kps, True
    name = get(f'{prefix}_imname')
    image = common.read_image(os.path.join(root, 'JPEGImages', category, name))
    size = list(get(f'{prefix}_imsize'))[:2]  # [W, H, 3]
    if size != [image.width, image.height]:
      common.fail(path, f'{prefix}_imsize', f'{size} (W, H), the image is {image.width}x{image.height}')
    mask = _mask(os.path.join(root, 'Segmentation', category, os.path.splitext(name)[0] + '.png'),
                 category, image)
    example[side] = common.side(image, keypoints, visible, get(f'{prefix}_bndbox'), [mask])
  return example


def _mask(path, category, image) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as png:
      labels = np.asarray(png)
  except OSError as e:
    common.fail(path, 'segmentation', f'not a readable PNG ({e})')
  if labels.shape[:2] != (image.height, image.width):
    common.fail(path, 'segmentation', f'{labels.shape[:2]}, the image is {image.height}x{image.width}')
  labels = labels if labels.ndim == 2 else labels[..., 0]
  mask = labels == _VOC_INDEX[category]
  return mask if mask.any() else (labels != 0) & (labels != 255)
