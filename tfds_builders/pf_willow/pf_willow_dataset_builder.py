"""pf_willow: PF-WILLOW (Ham et al., 2016), 900 test pairs of 10 classes with 10 keypoints each.

Test only, as in the literature. `test_pairs.csv` is read by its header's names: `imageA`, `imageB` (source
and target paths), `XA1..XA10`, `YA1..YA10` (source keypoints), `XB1..XB10`, `YB1..YB10` (target). Paths
look like `PF-dataset/car(G)/Cars_006a.png`; a flattened copy (`car(G)/Cars_006a.png`) is accepted too.
The class is the image's folder. The box is the extent of the valid keypoints only (the peers' padded keypoints leaked into it: REFERENCE.md section 4).
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders import common

CATEGORIES = ('car(G)', 'car(M)', 'car(S)', 'duck(S)', 'motorbike(G)', 'motorbike(M)', 'motorbike(S)',
              'winebottle(M)', 'winebottle(wC)', 'winebottle(woC)')
NUM_KEYPOINTS = 10
COORDINATE_COLUMNS = tuple(f'{axis}{side}{k}' for side in 'AB' for axis in 'XY'
                           for k in range(1, NUM_KEYPOINTS + 1))  # XA1..XA10, YA1..YA10, XB1.., YB1..

_CITATION = """
@inproceedings{ham2016proposal,
  title={Proposal Flow},
  author={Ham, Bumsub and Cho, Minsu and Schmid, Cordelia and Ponce, Jean},
  booktitle={CVPR},
  year={2016}
}
"""


class Builder(common.ManualBuilder):
  """PF-WILLOW test pairs (keypoints, boxes from them; no masks)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: test split, boxes from the valid keypoints.'}
  OFFICIAL_PAIRS = {'': {'test': 900}}  # the official count; `build` says how many a build lacks
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download PF-WILLOW (PF-dataset.zip from https://www.di.ens.fr/willow/research/proposalflow/, with the
  test_pairs.csv the peers ship, e.g. NC-Net's datasets/proposal-flow-willow). manual_dir holds
  test_pairs.csv and PF-dataset/<class>/<name>.png (or <class>/<name>.png).
  Then: python -m tfds_builders.build pf_willow --manual_dir <path>
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features.pair_features(CATEGORIES),
        homepage='https://www.di.ens.fr/willow/research/proposalflow/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    return {'test': self._generate_examples(common.manual_path(dl_manager))}

  def _generate_examples(self, root):
    path = os.path.join(root, 'test_pairs.csv')
    jobs = []
    for i, record in enumerate(common.read_csv_records(path, ('imageA', 'imageB') + COORDINATE_COLUMNS)):
      stems = '-'.join(os.path.splitext(os.path.basename(record[c]))[0] for c in ('imageA', 'imageB'))
      jobs.append((f'{i:04d}-{stems}',
                   lambda record=record, where=f'{path} row {i + 2}': _pair(root, record, where)))
    yield from self.checked_examples('test', jobs)


def _image_path(root, path) -> str:
  """The file as written, else its flattened copy <class>/<name>."""
  as_written = os.path.join(root, path.strip())
  flat = os.path.join(root, *path.strip().split('/')[-2:])
  return as_written if common.exists(as_written) or not common.exists(flat) else flat


def _pair(root, record, where) -> dict:
  paths = record['imageA'], record['imageB']
  category = paths[0].split('/')[-2] if '/' in paths[0] else ''
  if category not in CATEGORIES:
    common.fail(where, 'imageA', f'class folder {category!r} is not one of {CATEGORIES}')
  coords = np.array([common.number(record[c], where, c) for c in COORDINATE_COLUMNS],
                    np.float32).reshape(4, NUM_KEYPOINTS)  # rows XA, YA, XB, YB
  keypoints = [np.stack(coords[0:2], 1), np.stack(coords[2:4], 1)]
  valid = np.isfinite(keypoints[0]).all(1) & np.isfinite(keypoints[1]).all(1)
  valid &= (keypoints[0] >= 0).all(1) & (keypoints[1] >= 0).all(1)
  example = {'category': category}
  for name, path, kps in zip(features.SIDES, paths, keypoints):
    kps, vis = kps[None], valid[None]
    example[name] = common.side(common.read_image(_image_path(root, path)), kps, vis,
                                common.keypoint_box(kps, vis))
  return example
