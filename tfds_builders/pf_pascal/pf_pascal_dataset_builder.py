"""pf_pascal: PF-PASCAL (Ham et al., 2018), 20 PASCAL VOC classes, in the two flavours the peers distribute.

- `chm` (CHM, CATs, HSNet): `{trn,val,test}_pairs.csv` with the columns `source_image`, `target_image`,
  `class` (1-based) and, in the training file only, `flip` (the validation and test files carry NC-Net's
  `XA, YA, XB, YB` instead, which this flavour ignores); keypoints (`kps`, K x 2, NaN rows for missing
  points) and `bbox` come from `Annotations/<class>/<name>.mat`. `flip = 1` mirrors both images and their
  annotations (x -> W - x); a file without the column flips nothing.
- `ncnet` (NC-Net): `image_pairs/{val,test}_pairs.csv` with the coordinates inside (`XA, YA, XB, YB`, each
  `;`-separated, padded with -1); the box is the extent of the pair's valid keypoints.
A pair keeps only the keypoints valid in both images (slot k stays keypoint k of the class). Image paths
may carry a `PF-dataset-PASCAL/JPEGImages/` prefix; the file is found under `JPEGImages/` by its basename.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders import common

CATEGORIES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
              'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
              'tvmonitor')
NUM_KEYPOINTS = 20
_CHM_FILES = {'train': 'trn_pairs.csv', 'validation': 'val_pairs.csv', 'test': 'test_pairs.csv'}
_NCNET_FILES = {'validation': 'image_pairs/val_pairs.csv', 'test': 'image_pairs/test_pairs.csv'}

_CITATION = """
@article{ham2018proposal,
  title={Proposal Flow: Semantic Correspondences from Object Proposals},
  author={Ham, Bumsub and Cho, Minsu and Schmid, Cordelia and Ponce, Jean},
  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},
  year={2018}
}
"""


class Builder(common.ManualBuilder):
  """PF-PASCAL pairs with the keypoints valid in both images (no masks)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: CHM/CATs and NC-Net flavours.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='chm', description='CHM/CATs split files and .mat annotations: '
                              'train / validation / test.'),
      tfds.core.BuilderConfig(name='ncnet', description='NC-Net pair files with coordinates: the splits '
                              'whose file is present (test required, validation optional).'),
  ]
  # The peers' validation and test pair counts (their split files); `build` says how many a build lacks.
  OFFICIAL_PAIRS = {'chm': {'validation': 308, 'test': 299}, 'ncnet': {'validation': 308, 'test': 299}}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Build the flavour whose files you have; manual_dir is the PF-PASCAL folder.
  chm:   the CHM/CATs distribution (PF-PASCAL.zip of CHM or CATs): manual_dir holds trn_pairs.csv,
         val_pairs.csv, test_pairs.csv, JPEGImages/<name>.jpg and Annotations/<class>/<name>.mat.
         python -m tfds_builders.build pf_pascal/chm --manual_dir <path>/PF-PASCAL
  ncnet: NC-Net's datasets/pf-pascal (download.sh of ignacio-rocco/ncnet): manual_dir holds
         image_pairs/test_pairs.csv (and optionally val_pairs.csv) and PF-dataset-PASCAL/JPEGImages/.
         python -m tfds_builders.build pf_pascal/ncnet --manual_dir <path>/pf-pascal
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.pair_features(CATEGORIES),
        homepage='https://www.di.ens.fr/willow/research/proposalflow/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root = common.manual_path(dl_manager)
    if self.builder_config.name == 'chm':
      return {split: self._generate_examples(root, split, os.path.join(root, name), _chm_pair)
              for split, name in _CHM_FILES.items()}
    files = {split: os.path.join(root, name) for split, name in _NCNET_FILES.items()}
    if not common.exists(files['test']):
      common.fail(files['test'], '(file)', 'missing: the ncnet flavour needs its test pairs')
    return {split: self._generate_examples(root, split, path, _ncnet_pair)
            for split, path in files.items() if common.exists(path)}

  def _generate_examples(self, root, split, path, make_pair):
    required = ('source_image', 'target_image', 'class') + (('XA', 'YA', 'XB', 'YB')
                                                             if make_pair is _ncnet_pair else ())
    jobs = []
    for i, record in enumerate(common.read_csv_records(path, required)):
      key = f'{i:05d}-{_stem(record["source_image"])}-{_stem(record["target_image"])}'
      where = f'{path} row {i + 2}'  # 1-based, after the header
      jobs.append((key, lambda record=record, where=where: make_pair(root, record, where)))
    yield from self.checked_examples(split, jobs)


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path.strip()))[0]


def _category(record, where) -> str:
  index = common.number(record['class'], where, 'class')
  if index != int(index) or not 1 <= index <= len(CATEGORIES):
    common.fail(where, 'class', f'{record["class"]!r} is not a class index in 1..{len(CATEGORIES)}')
  return CATEGORIES[int(index) - 1]


def _image_path(root, path) -> str:
  """The file a CSV names: as written if it exists, else by basename under JPEGImages/."""
  path = path.strip()
  for candidate in (os.path.join(root, path),
                    os.path.join(root, 'JPEGImages', os.path.basename(path)),
                    os.path.join(root, 'PF-dataset-PASCAL', 'JPEGImages', os.path.basename(path))):
    if common.exists(candidate):
      return candidate
  return os.path.join(root, 'JPEGImages', os.path.basename(path))  # read_image names it as missing


def _pair(category, images, keypoints, valid, boxes) -> dict:
  """The example of a pair whose sides each hold one instance: keypoints kept where valid in both."""
  both = valid[0] & valid[1]
  example = {'category': category}
  for name, image, kps, box in zip(features.SIDES, images, keypoints, boxes):
    padded = np.zeros((1, NUM_KEYPOINTS, 2), np.float32)
    padded[0, :len(kps)] = np.nan_to_num(kps)
    vis = np.zeros((1, NUM_KEYPOINTS), bool)
    vis[0, :len(kps)] = both
    if box is None:
      box = common.keypoint_box(padded, vis)
    example[name] = common.side(image, padded, vis, box)
  return example


def _chm_pair(root, record, where) -> dict:
  category = _category(record, where)
  flip = bool(record.get('flip')) and common.number(record['flip'], where, 'flip') == 1
  images, keypoints, valid, boxes = [], [], [], []
  for path in (record['source_image'], record['target_image']):
    image = common.read_image(_image_path(root, path), mirror=flip)
    mat_path = os.path.join(root, 'Annotations', category, _stem(path) + '.mat')
    mat = common.read_mat(mat_path, ('kps', 'bbox'))
    kps, box = mat['kps'], mat['bbox'].reshape(-1)
    if kps.ndim != 2 or kps.shape[1] != 2 or len(kps) > NUM_KEYPOINTS:
      common.fail(mat_path, 'kps', f'shape {kps.shape}, expected [K <= {NUM_KEYPOINTS}, 2]')
    if box.shape != (4,):
      common.fail(mat_path, 'bbox', f'{box.size} values, expected 4 (x1, y1, x2, y2)')
    if flip:
      kps = np.stack([image.width - kps[:, 0], kps[:, 1]], 1)
      box = np.array([image.width - box[2], box[1], image.width - box[0], box[3]])
    images.append(image)
    keypoints.append(kps)
    valid.append(np.isfinite(kps).all(1))
    boxes.append(box)
  if len(keypoints[0]) != len(keypoints[1]):
    common.fail(where, 'kps', f'the source .mat has {len(keypoints[0])} keypoints, the target '
                f'{len(keypoints[1])}')
  return _pair(category, images, keypoints, valid, boxes)


def _ncnet_pair(root, record, where) -> dict:
  category = _category(record, where)

  def coords(name):
    return np.array([common.number(v, where, name) for v in record[name].split(';') if v.strip()])

  keypoints = []
  for x_name, y_name in (('XA', 'YA'), ('XB', 'YB')):
    x, y = coords(x_name), coords(y_name)
    if len(x) != len(y) or len(x) > NUM_KEYPOINTS:
      common.fail(where, y_name, f'{len(y)} values for {len(x)} in {x_name} (at most {NUM_KEYPOINTS})')
    keypoints.append(np.stack([x, y], 1))
  if len(keypoints[0]) != len(keypoints[1]):
    common.fail(where, 'XB', f'{len(keypoints[1])} target keypoints for {len(keypoints[0])} source ones')
  images = [common.read_image(_image_path(root, record[c])) for c in ('source_image', 'target_image')]
  valid = [(kps >= 0).all(1) for kps in keypoints]  # -1 pads
  return _pair(category, images, keypoints, valid, [None, None])
