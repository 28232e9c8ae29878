"""The input pipeline: batches split over the mesh, geometry of resizing, exact resume, evaluation padding."""

import os
import shutil
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from misc_jax import input_pipeline
from misc_jax import sharding
from misc_jax import visualize
from tfds_builders import build


def _dot_side(width, height, x, y):
  """A white image with a red dot of radius 3 px centred at continuous (x, y), as a decoded side."""
  cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
  image = np.full((height, width, 3), 255, np.uint8)
  image[np.hypot(cols - x, rows - y) <= 3] = (255, 0, 0)
  mask = np.zeros((1, height, width, 1), np.uint8)
  mask[0, int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3] = 255
  return {
      'image': tf.constant(image), 'instance_ids': tf.constant([0], tf.int64),
      'keypoints': tf.constant([[[x, y]]], tf.float32),
      'keypoint_visible': tf.constant([[True]]),
      'bboxes': tf.constant([[x - 3, y - 3, x + 3, y + 3]], tf.float32),
      'masks': tf.constant(mask),
  }


def _red_centroid(image):
  """Centroid of red (not white, not the black letterbox padding), in continuous coordinates."""
  darkness = image[..., 0].astype(np.float64) - image[..., 1]
  darkness[darkness < 64] = 0
  rows, cols = np.mgrid[:image.shape[0], :image.shape[1]] + 0.5
  return np.array([(cols * darkness).sum(), (rows * darkness).sum()]) / darkness.sum()


@pytest.mark.parametrize('keep_aspect', [False, True])
@pytest.mark.parametrize('width,height,x,y', [(160, 96, 40.5, 70.25), (90, 200, 60.0, 33.5)])
def test_keypoint_stays_on_the_dot_after_resize(smoke_config, keep_aspect, width, height, x, y):
  smoke_config.input.keep_aspect = keep_aspect
  out = input_pipeline.preprocess_side(_dot_side(width, height, x, y), 'dot', smoke_config)
  image, kp = out['image'].numpy(), out['keypoints'].numpy()[0, 0]
  assert image.shape == (64, 64, 3)
  np.testing.assert_allclose(_red_centroid(image), kp, atol=0.35)
  np.testing.assert_allclose(kp, [x, y] * out['scale'].numpy(), rtol=1e-6)
  # The mask and the box moved with the keypoint.
  rows, cols = np.nonzero(out['masks'].numpy()[0])
  assert abs(cols.mean() + 0.5 - kp[0]) < 2 and abs(rows.mean() + 0.5 - kp[1]) < 2
  box = out['bboxes'].numpy()[0]
  np.testing.assert_allclose((box[:2] + box[2:]) / 2, kp, atol=1e-4)
  if keep_aspect:
    assert out['scale'].numpy()[0] == out['scale'].numpy()[1]


def test_too_many_instances_is_an_error_naming_the_pair(smoke_config):
  smoke_config.input.max_instances = 0
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r"(?s)pair.*dot.*more instances than config.input.max_instances=0"):
    input_pipeline.preprocess_side(_dot_side(32, 32, 10, 10), 'dot', smoke_config)


@pytest.mark.parametrize('mesh_shape', [(8, 1), (2, 4)])
def test_train_batches_are_split_over_every_device_of_the_mesh(smoke_config, mesh_shape):
  assert jax.local_device_count() == 8
  smoke_config.mesh.batch, smoke_config.mesh.fsdp = mesh_shape
  mesh = sharding.make_mesh(smoke_config)
  batch = sharding.global_batch(mesh, next(input_pipeline.train_iterator(smoke_config)))
  b, s, i, k = 8, 64, 3, 12
  expected = {
      'image': ((b, s, s, 3), np.uint8), 'keypoints': ((b, i, k, 2), np.float32),
      'keypoint_valid': ((b, i, k), np.bool_), 'bboxes': ((b, i, 4), np.float32),
      'instance_valid': ((b, i), np.bool_), 'masks': ((b, i, s, s), np.bool_),
      'has_masks': ((b,), np.bool_), 'scale': ((b, 2), np.float32)}
  for side in ('source', 'target'):
    for key, (shape, dtype) in expected.items():
      x = batch[side][key]
      assert isinstance(x, jax.Array) and (x.shape, x.dtype) == (shape, dtype), (side, key)
      assert {shard.data.shape[0] for shard in x.addressable_shards} == {1}, key  # a pair a device
      assert sorted(shard.index[0].start for shard in x.addressable_shards) == list(range(8)), key
  assert batch['category'].shape == (b,) and batch['valid'].all()
  src = jax.device_get(batch['source'])
  # Padding is marked invalid and zeroed; real keypoints lie inside the image.
  assert not src['keypoint_valid'][~src['instance_valid']].any()
  assert (src['keypoints'][~src['keypoint_valid']] == 0).all()
  kps = src['keypoints'][src['keypoint_valid']]
  assert len(kps) and (kps >= 0).all() and (kps <= s).all()


def test_resume_from_a_step_gives_the_same_batches(smoke_config):
  smoke_config.batch_size = 8
  run = input_pipeline.train_iterator(smoke_config)
  batches = [next(run) for _ in range(3)]  # 24 examples: crosses epochs of the 6-pair split
  resumed = next(input_pipeline.train_iterator(smoke_config, start_step=2))
  for a, b in zip(jax.tree.leaves(batches[2]), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(batches[0]['source']['image'], batches[1]['source']['image'])
  # A late start reads only its own epoch's records before it, not every earlier one (8e8 records here:
  # hours when the stream was skipped from the start).
  start = time.perf_counter()
  next(input_pipeline.train_iterator(smoke_config, start_step=10 ** 8))
  assert time.perf_counter() - start < 60
  other_seed = smoke_config.copy_and_resolve_references()
  other_seed.seed = 1
  assert not np.array_equal(
      next(input_pipeline.train_iterator(other_seed))['source']['image'],
      batches[0]['source']['image'])


def test_evaluation_visits_every_pair_once_with_padding(smoke_config):
  batches = list(input_pipeline.eval_iterator(smoke_config, 'validation'))
  assert len(batches) == 1  # 3 pairs in one global batch of 8
  valid = batches[0]['valid'].reshape(-1)
  np.testing.assert_array_equal(valid, [True] * 3 + [False] * 5)
  assert batches[0]['target']['has_masks'].reshape(-1)[:3].all()
  # No augmentation at evaluation: two passes are identical.
  again = list(input_pipeline.eval_iterator(smoke_config, 'validation'))
  np.testing.assert_array_equal(batches[0]['source']['image'], again[0]['source']['image'])


def test_batch_size_must_split_over_the_data_shards(smoke_config):
  """The pipeline checks its own split (shards); the devices' split is train.check_config's (test_optim)."""
  smoke_config.batch_size, smoke_config.input.data_shards = 12, 5
  with pytest.raises(ValueError, match='data_shards=5 must be a multiple of the 1 processes and divide '
                                       'config.batch_size=12'):
    next(input_pipeline.train_iterator(smoke_config))


def test_preview_png_is_written(smoke_config, tmp_path):
  batch = next(input_pipeline.train_iterator(smoke_config))
  path = tmp_path / 'pairs.png'
  visualize.save_pairs(batch, str(path), num_pairs=2, category_names=['a', 'b', 'c', 'd', 'e'])
  image = np.asarray(__import__('PIL.Image').Image.open(path))
  assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 10


def _dot_example(width, height, x, y):
  side = _dot_side(width, height, x, y)
  return {'pair_id': tf.constant('dot'), 'category': tf.constant(0), 'source': side, 'target': dict(side)}


def test_box_crop_keeps_the_object_and_its_keypoint_on_the_dot(smoke_config):
  """CATs' crop (p = 1 here): the window varies with the example, always holds the instance's box, and
  the keypoint stays on the dot after crop and resize."""
  smoke_config.input.augment.box_crop = 1.0
  smoke_config.input.augment.photometric = False
  scales = set()
  for index in range(6):
    out = input_pipeline.preprocess(_dot_example(160, 96, 40.5, 70.25), config=smoke_config, train=True,
                                    index=tf.constant(index, tf.int64))['source']
    image, kp = out['image'].numpy(), out['keypoints'].numpy()[0, 0]
    zoom = out['scale'].numpy()  # a small window is enlarged: so is the dot's rasterisation error
    np.testing.assert_allclose(_red_centroid(image), kp, atol=0.35 * zoom.max())
    box = out['bboxes'].numpy()[0]
    assert (box[:2] >= -1e-3).all() and (box[2:] <= 64 + 1e-3).all()
    scales.add(round(float(box[2] - box[0]), 2))
  assert len(scales) > 3  # the crops differ


def test_cats_colour_augmentations_keep_the_image_valid_and_differ_from_the_original(smoke_config):
  smoke_config.input.augment.photometric = False
  plain = input_pipeline.preprocess(_dot_example(64, 64, 20, 30), config=smoke_config, train=True,
                                    index=tf.constant(0, tf.int64))['source']['image'].numpy()
  smoke_config.input.augment.cats_colour = 1.0  # every one of the seven
  out = input_pipeline.preprocess(_dot_example(64, 64, 20, 30), config=smoke_config, train=True,
                                  index=tf.constant(0, tf.int64))['source']['image'].numpy()
  assert out.dtype == np.uint8 and out.shape == plain.shape and np.abs(out.astype(int) - plain).mean() > 5


def test_equalize_matches_opencvs_formula():
  from misc_jax import augment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(40, 120, (16, 16, 3)).astype(np.float32)
  out = augment._equalize(tf.constant(image)).numpy()  # pylint: disable=protected-access
  for c in range(3):
    hist = np.bincount(image[..., c].astype(int).ravel(), minlength=256)
    cdf = np.cumsum(hist)
    first = cdf[hist > 0][0]
    lut = np.round((cdf - first) * 255 / (image[..., c].size - first))
    np.testing.assert_array_equal(out[..., c], lut[image[..., c].astype(int)])


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_a_damaged_record_file_is_named_with_the_command_that_rebuilds_it(smoke_config, tmp_path, split):
  shutil.copytree(smoke_config.dataset.data_dir, tmp_path, dirs_exist_ok=True)
  smoke_config.dataset.data_dir = str(tmp_path)
  builder = build.get_builder(smoke_config.dataset.name, str(tmp_path))
  shard = os.fspath(builder.info.splits[split].filepaths[0])
  with open(shard, 'r+b') as f:  # flip bytes in the middle: the file keeps its size
    f.seek(os.path.getsize(shard) // 2)
    data = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in data))
  batches = (input_pipeline.train_iterator(smoke_config) if split == 'train'
             else input_pipeline.eval_iterator(smoke_config, split))
  with pytest.raises(input_pipeline.DamagedDataError) as error:
    for _ in range(4):
      next(batches)
  message = str(error.value)
  assert f'damaged record file {shard} ' in message
  assert message.endswith('rebuild the dataset: python -m tfds_builders.build synthetic_misc/tiny '
                          f'--data_dir {tmp_path} --overwrite')
