"""The synthetic dataset: determinism, split separation, annotation consistency, and bad-record errors."""

import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from misc_jax import features
from tfds_builders import build
from tfds_builders.synthetic_misc import shapes
from tfds_builders.synthetic_misc import synthetic_misc_dataset_builder as synthetic

CONFIGS = {c.name: c for c in synthetic.Builder.BUILDER_CONFIGS}


def _digest(example):
  h = hashlib.sha256()
  for side in features.SIDES:
    for key in ('image', 'keypoints', 'keypoint_visible', 'bboxes', 'masks', 'dense_points', 'dense_visible'):
      h.update(np.ascontiguousarray(example[side][key]).tobytes())
  return h.hexdigest()


def test_generation_is_deterministic():
  config = CONFIGS['default']
  assert _digest(synthetic.make_pair(config, 'train', 7)) == _digest(
      synthetic.make_pair(config, 'train', 7))
  assert _digest(synthetic.make_pair(config, 'train', 7)) != _digest(
      synthetic.make_pair(config, 'train', 8))


def test_large_extends_default_pair_for_pair():
  # Pretraining on `large` and evaluating on `default` is fair only if they share validation and test.
  large, default = CONFIGS['large'], CONFIGS['default']
  assert large.num_pairs['train'] > default.num_pairs['train']
  for split in ('validation', 'test'):
    assert large.num_pairs[split] == default.num_pairs[split]
  for split, index in (('train', 1999), ('validation', 0), ('test', 199)):
    assert _digest(synthetic.make_pair(large, split, index)) == _digest(
        synthetic.make_pair(default, split, index))


def test_two_builds_write_identical_records(tiny_data_dir, tmp_path):
  build.build('synthetic_misc/tiny', str(tmp_path))
  for split in ('train', 'test'):
    a = list(tfds.as_numpy(tfds.load('synthetic_misc/tiny', split=split, data_dir=tiny_data_dir)))
    b = list(tfds.as_numpy(tfds.load('synthetic_misc/tiny', split=split, data_dir=str(tmp_path))))
    assert [x['pair_id'] for x in a] == [x['pair_id'] for x in b]
    for x, y in zip(a, b):
      assert _digest(x) == _digest(y)


def test_no_image_is_shared_across_splits(tiny_data_dir):
  seen = {}
  for split in ('train', 'validation', 'test'):
    for ex in tfds.as_numpy(tfds.load('synthetic_misc/tiny', split=split, data_dir=tiny_data_dir)):
      for side in features.SIDES:
        key = hashlib.sha256(ex[side]['image'].tobytes()).hexdigest()
        assert seen.setdefault(key, split) == split


@pytest.mark.parametrize('name', ['default', 'small_objects'])
def test_annotations_are_consistent(name):
  config = CONFIGS[name]
  areas, counts = [], set()
  for index in range(12):
    ex = synthetic.make_pair(config, 'validation', index)
    for side in features.SIDES:
      s = ex[side]
      counts.add(len(s['instance_ids']))
      for kps, vis, box, mask in zip(s['keypoints'], s['keypoint_visible'], s['bboxes'],
                                     s['masks']):
        rows, cols = np.nonzero(mask)
        np.testing.assert_array_equal(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        # A visible keypoint lies on (or within 1.5 px of) its own instance's visible silhouette.
        for x, y in kps[vis]:
          d = np.min(np.hypot(cols + 0.5 - x, rows + 0.5 - y))
          assert d <= 1.5, (name, index, side, x, y, d)
        areas.append((box[2] - box[0]) * (box[3] - box[1]) / config.image_size**2)
  assert len(counts) > 1  # images hold different numbers of instances
  if name == 'small_objects':
    assert max(areas) < 0.05
  else:
    assert min(areas) < 0.05 < 0.2 < max(areas)  # small and large objects both occur


def test_keypoints_are_semantic_per_category():
  rng = np.random.default_rng(0)
  for name, family in shapes.CATEGORIES.items():
    counts = {len(family(rng).keypoints) for _ in range(5)}
    assert len(counts) == 1 and 6 <= counts.pop() <= shapes.NUM_KEYPOINTS, name


def test_dense_points_agree_with_the_keypoints_they_extend():
  """Dense point 3e + 1 is the midpoint of outline edge e, point 3e + t of the (t / 4) point along it: in
  pixels they must equal those combinations of the instance's own (visible) keypoints, in every image
  (an affine pose maps combinations to combinations). Visible dense points sit on their instance."""
  checked = 0
  for index in range(10):
    ex = synthetic.make_pair(CONFIGS['default'], 'validation', index)
    outline = list(shapes.OUTLINES[ex['category']])
    for side in features.SIDES:
      s = ex[side]
      for kps, vis, dense, seen, mask in zip(s['keypoints'], s['keypoint_visible'], s['dense_points'],
                                             s['dense_visible'], s['masks']):
        for e, (a, b) in enumerate(zip(outline, outline[1:] + outline[:1])):
          for t in (1, 2, 3):
            if vis[a] and vis[b] and seen[3 * e + t - 1]:
              np.testing.assert_allclose(dense[3 * e + t - 1], kps[a] + t / 4 * (kps[b] - kps[a]), atol=1e-3)
              checked += 1
        rows, cols = np.nonzero(mask)
        for x, y in dense[seen]:  # on the instance's visible silhouette, or in a pixel next to it
          assert np.min(np.hypot(cols + 0.5 - x, rows + 0.5 - y)) <= 1.5 * np.sqrt(2)
        assert (dense[~seen] == -1).all() and not seen[len(shapes.dense_weights(ex['category']).any(-1)
                                                           .nonzero()[0]):].any()
  assert checked > 200


def _side():
  ex = synthetic.make_pair(CONFIGS['tiny'], 'train', 0)
  return {k: np.copy(v) for k, v in ex['source'].items()}


@pytest.mark.parametrize('field,corrupt,message', [
    ('keypoints', lambda s: s['keypoints'][:, :3], "field source/keypoint_visible"),
    ('keypoints', lambda s: s['keypoints'][..., :1], "field source/keypoints: shape"),
    ('keypoints', lambda s: np.where(s['keypoint_visible'][..., None], 500., s['keypoints']),
     'lies outside'),
    ('masks', lambda s: np.zeros_like(s['masks']), 'is empty'),
    ('bboxes', lambda s: s['bboxes'] * [1, 1, 0, 1], 'zero-area box'),
    ('instance_ids', lambda s: np.zeros_like(s['instance_ids']), 'not unique'),
])
def test_validation_names_dataset_split_key_and_field(field, corrupt, message):
  side = _side()
  if field == 'instance_ids' and len(side[field]) < 2:
    side = {k: np.concatenate([v, v]) if k != 'image' else v for k, v in side.items()}
  side[field] = corrupt(side)
  with pytest.raises(features.InvalidExampleError, match=message) as err:
    features.validate_side(side, dataset='synthetic_misc', split='train', key='train_000000',
                           name='source')
  assert str(err.value).startswith("synthetic_misc/train example 'train_000000': field source/")


def test_builder_rejects_a_malformed_record(monkeypatch, tmp_path):
  original = synthetic.make_pair

  def broken(config, split, index):
    ex = original(config, split, index)
    if split == 'validation' and index == 1:
      ex['target']['bboxes'][0, 2] = ex['target']['bboxes'][0, 0]
    return ex

  monkeypatch.setattr(synthetic, 'make_pair', broken)
  with pytest.raises(features.InvalidExampleError,
                     match="synthetic_misc/validation example 'validation_000001': field "
                           "target/bboxes: zero-area"):
    build.build('synthetic_misc/tiny', str(tmp_path))


def test_validation_rejects_different_keypoint_counts_in_a_pair():
  ex = synthetic.make_pair(CONFIGS['tiny'], 'train', 1)
  ex['target']['keypoints'] = ex['target']['keypoints'][:, :-1]
  ex['target']['keypoint_visible'] = ex['target']['keypoint_visible'][:, :-1]
  with pytest.raises(features.InvalidExampleError,
                     match='field target/keypoints: 11 keypoints per instance, the source has 12'):
    features.validate_pair(ex, dataset='synthetic_misc', split='train', key='train_000001')
