"""misc210k: multi-instance semantic correspondence pairs (Sun et al., CVPR 2023), from the COCO-format files.

Input: the UniFS re-packaging of MISC210K (REFERENCE.md sections 1 and 3): COCO keypoint-format JSON, one file
per split, keypoints padded to 52 per instance, masks as polygons or RLE, and the COCO 2014 images.

Pairs: two images of the same category. Every non-crowd instance of the category in each image is kept, so
both sides hold several instances, and keypoint k of any source instance corresponds to keypoint k of every
target instance. The official pair list is not public; by default each image is paired with the next
`PAIRS_PER_IMAGE` images of its category (images in id order, cyclic), which over the 4,812 images gives
about the paper's 218,179 pairs. A pair-list file overrides that (see the instructions). Crowd annotations
(iscrowd = 1) are dropped. A keypoint is visible when it is labelled (v = 1 occluded or v = 2 visible).

Splits: the release has train and test only. `validation` (for model selection, so the test split is
never used to choose a checkpoint) takes 1 in VALIDATION_EVERY of the training file's images, chosen by a
hash of the file name (CRC-32): deterministic, independent of order, and by image, so no image is in two
splits; pairs are formed within each split.
"""

import collections
import functools
import os
import zlib

import numpy as np
from pycocotools import mask as mask_utils
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders import common

CATEGORIES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'boat', 'stop sign', 'bench',
    'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'bear', 'zebra', 'giraffe', 'tie', 'skis',
    'baseball bat', 'skateboard', 'tennis racket', 'bottle', 'cup', 'fork', 'chair', 'bed', 'tv', 'laptop',
    'mouse', 'clock', 'toothbrush')
NUM_KEYPOINTS = 52
PAIRS_PER_IMAGE = 45
SPLIT_DIR = 'misc210k_cocosplit/datasplit'
IMAGE_DIR = 'coco/trainval2014'
ANNOTATION_FILES = {'train': 'misc_trainvalno5k.json', 'test': 'misc_5k.json'}
VALIDATION_EVERY = 20  # 1 in 20 training images (5%) form the validation split

_CITATION = """
@inproceedings{sun2023misc210k,
  title={MISC210K: A Large-Scale Dataset for Multi-Instance Semantic Correspondence},
  author={Sun, Yixuan and Huang, Yiwen and Guo, Haijing and Zhao, Yuzhou and Wu, Runmin and Yu, Yizhou and
          Ge, Weifeng and Zhang, Wenqiang},
  booktitle={CVPR},
  year={2023}
}
"""


# One entry of `images[]`, with the annotation file it came from (for error messages).
ImageEntry = collections.namedtuple('ImageEntry', 'id file_name height width annotation_file')


class Builder(common.ManualBuilder):
  """MISC210K image pairs with every instance's mask, box and 52 keypoint slots."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: COCO-format input, deterministic or listed pairs.',
                   '1.1.0': 'A validation split held out from the training images (1 in 20, by file name).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  MISC210K needs a signed agreement with its authors (https://github.com/YXSUNMADMAX/MISC210K). Unpack the
  COCO-format release (as re-packaged by UniFS) and the COCO 2014 train+val images so that manual_dir holds:

    {SPLIT_DIR}/misc_trainvalno5k.json      train and validation splits (COCO keypoint format)
    {SPLIT_DIR}/misc_5k.json                test split
    {IMAGE_DIR}/COCO_train2014_000000000009.jpg ...   every image the JSON files name

  Optional files in {SPLIT_DIR}/:
    splits.json         {{"train": [file_name, ...], "validation": [...], "test": [...]}}: re-splits the
                        images of both annotation files (any split names)
    pairs_<split>.json  [[source file_name, target file_name, category name], ...]: the pairs of <split>,
                        instead of pairing each image with the next {PAIRS_PER_IMAGE} of its category

  Then: python -m tfds_builders.build misc210k --manual_dir <manual_dir>
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.pair_features(CATEGORIES),
        homepage='https://github.com/YXSUNMADMAX/MISC210K',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root = common.manual_path(dl_manager)
    images, instances = {}, collections.defaultdict(list)  # instances[(image id, category)]
    by_file = {}
    for split, name in ANNOTATION_FILES.items():
      path = os.path.join(root, SPLIT_DIR, name)
      by_file[split] = self._read_annotations(path, split, images, instances)
    held_out = lambda i: zlib.crc32(images[i].file_name.encode()) % VALIDATION_EVERY == 0
    splits = {'train': [i for i in by_file['train'] if not held_out(i)],
              'validation': [i for i in by_file['train'] if held_out(i)], 'test': by_file['test']}
    split_file = os.path.join(root, SPLIT_DIR, 'splits.json')
    if common.exists(split_file):
      splits = _read_split_file(split_file, images)
    pairs = {split: self._pairs(root, split, ids, images, instances) for split, ids in splits.items()}
    pairs = common.drop_empty_splits(self.name, pairs, {split: len(ids) for split, ids in splits.items()})
    return {split: self._generate_examples(root, split, split_pairs, images, instances)
            for split, split_pairs in pairs.items()}

  def _read_annotations(self, path, split, images, instances) -> list[int]:
    """Adds the file's images and non-crowd instances to the indexes; returns its image ids."""
    data = common.read_json(path)
    for field in ('images', 'annotations', 'categories'):
      if not isinstance(data, dict) or field not in data:
        common.fail(path, field, 'missing: not a COCO annotation file')
    categories = {c['id']: c['name'] for c in data['categories']}
    ids = []
    for i, entry in enumerate(data['images']):
      try:
        image = ImageEntry(int(entry['id']), entry['file_name'], int(entry['height']),
                      int(entry['width']), path)
      except (KeyError, TypeError, ValueError) as e:
        common.fail(path, f'images[{i}]', f'needs id, file_name, height and width ({e!r})')
      images[image.id] = image
      ids.append(image.id)
    for i, ann in enumerate(data['annotations']):
      if ann.get('iscrowd', 0):
        continue
      field = f'annotations[{i}] (id {ann.get("id")})'
      name = categories.get(ann.get('category_id'))
      if name not in CATEGORIES:
        error = common.Error(f'{path}: field {field}.category_id: {ann.get("category_id")} '
                             f'({name!r}) is not one of the {len(CATEGORIES)} MISC210K categories')
        self.skip_or_raise(split, f'annotation {ann.get("id")}', error)
        continue
      if ann.get('image_id') not in images:
        common.fail(path, f'{field}.image_id', f'no image with id {ann.get("image_id")}')
      instances[(ann['image_id'], name)].append((field, ann))
    return ids

  def _pairs(self, root, split, image_ids, images, instances) -> list[tuple[int, int, str]]:
    """(source id, target id, category) of a split: its pair file's, else each image with the next ones of
    its category."""
    pair_file = os.path.join(root, SPLIT_DIR, f'pairs_{split}.json')
    if common.exists(pair_file):
      return _read_pair_file(pair_file, images, instances)
    return list(_default_pairs(set(image_ids), instances))

  def _generate_examples(self, root, split, pairs, images, instances):
    @functools.lru_cache(maxsize=4 * PAIRS_PER_IMAGE)
    def side(image_id, category):
      return _make_side(root, images[image_id], instances[(image_id, category)])

    jobs = ((f'{category}-{src}-{trg}', functools.partial(
        lambda s, t, c: {'category': c, 'source': side(s, c), 'target': side(t, c)}, src, trg, category))
            for src, trg, category in pairs)
    yield from self.checked_examples(split, jobs)


def _read_split_file(path, images) -> dict[str, list[int]]:
  by_name = {image.file_name: image.id for image in images.values()}
  splits = common.read_json(path)
  if not isinstance(splits, dict):
    common.fail(path, '(file)', 'expected {"split name": [image file names]}')
  out = {}
  for split, names in splits.items():
    unknown = [n for n in names if n not in by_name]
    if unknown:
      common.fail(path, split, f'{len(unknown)} images are in no annotation file, e.g. {unknown[0]!r}')
    out[split] = [by_name[n] for n in names]
  return out


def _default_pairs(image_ids, instances):
  """(source id, target id, category): each image with the next PAIRS_PER_IMAGE of its category."""
  by_category = collections.defaultdict(list)
  for image_id, category in instances:
    if image_id in image_ids:
      by_category[category].append(image_id)
  for category in CATEGORIES:
    ids = sorted(by_category[category])
    for i, src in enumerate(ids):
      for step in range(1, min(PAIRS_PER_IMAGE, len(ids) - 1) + 1):
        yield src, ids[(i + step) % len(ids)], category


def _read_pair_file(path, images, instances):
  by_name = {image.file_name: image.id for image in images.values()}
  pairs = common.read_json(path)
  out = []
  for i, pair in enumerate(pairs):
    if not (isinstance(pair, list) and len(pair) == 3):
      common.fail(path, f'[{i}]', f'{pair!r} is not [source file_name, target file_name, category]')
    names, category = pair[:2], pair[2]
    if category not in CATEGORIES:
      common.fail(path, f'[{i}][2]', f'{category!r} is not a MISC210K category')
    for name in names:
      if name not in by_name:
        common.fail(path, f'[{i}]', f'{name!r} is in no annotation file')
      if (by_name[name], category) not in instances:
        common.fail(path, f'[{i}]', f'{name!r} has no {category!r} instance')
    out.append((by_name[names[0]], by_name[names[1]], category))
  return out


def _make_side(root, image: ImageEntry, instances) -> dict:
  path = os.path.join(root, IMAGE_DIR, image.file_name)
  loaded = common.read_image(path)
  if (loaded.height, loaded.width) != (image.height, image.width):
    common.fail(image.annotation_file, f'images (id {image.id}).height/width',
                f'{image.height}x{image.width}, but {path} is {loaded.height}x{loaded.width}')
  keypoints, visible, boxes, masks = [], [], [], []
  for field, ann in instances:
    kps = np.asarray(ann.get('keypoints', []), np.float32)
    if kps.shape != (NUM_KEYPOINTS * 3,):
      common.fail(image.annotation_file, f'{field}.keypoints',
                  f'{kps.size} values, expected {NUM_KEYPOINTS} x 3 = {NUM_KEYPOINTS * 3}')
    kps = kps.reshape(NUM_KEYPOINTS, 3)
    keypoints.append(kps[:, :2])
    visible.append(kps[:, 2] > 0)
    x, y, w, h = np.asarray(ann.get('bbox', [0, 0, 0, 0]), np.float32)
    boxes.append([x, y, x + w, y + h])
    masks.append(_decode_mask(ann.get('segmentation'), image, f'{field}.segmentation', boxes[-1]))
  return common.side(loaded, keypoints, visible, boxes, masks)


def _decode_mask(segmentation, image: ImageEntry, field: str, box) -> np.ndarray:
  """Polygons, uncompressed RLE or compressed RLE -> [H, W] bool.

  An object smaller than a pixel can rasterise to nothing; its mask is then the pixel at its box centre.
  """
  h, w = image.height, image.width
  if isinstance(segmentation, list) and segmentation:
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
  elif isinstance(segmentation, dict) and 'counts' in segmentation:
    if list(segmentation.get('size', [])) != [h, w]:
      common.fail(image.annotation_file, f'{field}.size',
                  f'{segmentation.get("size")}, the image is {h}x{w}')
    compressed = not isinstance(segmentation['counts'], list)
    rle = segmentation if compressed else mask_utils.frPyObjects(segmentation, h, w)
  else:
    common.fail(image.annotation_file, field, 'neither polygons nor RLE')
  mask = mask_utils.decode(rle).astype(bool)
  if not mask.any():
    cx, cy = int(np.clip((box[0] + box[2]) / 2, 0, w - 1)), int(np.clip((box[1] + box[3]) / 2, 0, h - 1))
    mask[cy, cx] = True
  return mask
