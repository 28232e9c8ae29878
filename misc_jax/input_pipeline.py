"""Input pipeline: TFDS records -> decoded, resized, padded, augmented batches of this process's pairs.

Every dataset emits the schema of `misc_jax.features`; this module turns it into fixed-shape numpy
batches of the pairs this process feeds (`sharding.global_batch` makes them one global array):

  batch['source'|'target']:
    image          uint8   [B, S, S, 3]   S = config.input.image_size (B = the process's share of the batch)
    image_full     uint8   [B, F, F, 3]   with KBC only (kbc.eval, kbc.train_prob): the same view at
                                          F = kbc.max_scale x S, which KBC's crops are cut from
    keypoints      float32 [B, I, K, 2]   (x, y) pixels of the resized image; 0 where invalid
    keypoint_valid bool    [B, I, K]      visible and not padding
    bboxes         float32 [B, I, 4]      (x1, y1, x2, y2) pixels of the resized image
    instance_valid bool    [B, I]
    masks          bool    [B, I, S, S]   all False for datasets without masks (see has_masks)
    has_masks      bool    [B]
    scale          float32 [B, 2]         (sx, sy): resized = scale * original pixel coordinates
    dense_points   float32 [B, I, P, 2]   with config.input.max_dense_points = P > 0: the dataset's dense
    dense_valid    bool    [B, I, P]      training points (features.py), all invalid where it has none
  batch['category'] int32 [B];  batch['valid'] bool [B] (False on evaluation padding)
  batch['attributes'] {name: int32 [B]}  only for datasets with pair attributes (SPair-71k)

I = config.input.max_instances and K = config.input.max_keypoints pad instances and keypoints, so shapes
are static under jit. Training order is a pure function of (seed, step): each epoch of a data shard is
shuffled with a seed of (seed, epoch), so step n starts in a known epoch at a known offset; a resumed run
reads only the records of that epoch before the offset (still encoded), never the earlier epochs, and
augmentation draws its randomness from (seed, example index), so it sees the same batches.
"""

import math
import os
import sys
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from misc_jax import augment
from misc_jax import features
from tfds_builders import build

_SKIP = tfds.decode.SkipDecoding()


class DamagedDataError(OSError):
  """A dataset's record file that fails its checksums (a disk or copy error): rebuild the dataset."""


def damaged_files(builder, split: str) -> list[str]:
  """The record files of `split` (or of the split a slice such as 'train[:200]' cuts) that fail TFRecord's
  CRC checks."""
  files = builder.info.splits[split.split('[')[0]].filepaths
  bad = []
  for path in files:
    try:
      for _ in tf.data.TFRecordDataset(os.fspath(path)):
        pass
    except tf.errors.DataLossError:
      bad.append(os.fspath(path))
  return bad


def _named_damage(batches: Iterator[dict], config, split: str) -> Iterator[dict]:
  """`batches`, with TensorFlow's bare DataLossError (a corrupted record, no file named) turned into a
  DamagedDataError naming the damaged files and the command that rebuilds them."""
  try:
    yield from batches
  except Exception as e:  # pylint: disable=broad-except  (not GeneratorExit: at exit `tf` may be gone)
    if not isinstance(e, tf.errors.DataLossError):
      raise
    builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
    bad = damaged_files(builder, split)
    raise DamagedDataError(
        f'{config.dataset.name} {split}: damaged record file{"s" if len(bad) > 1 else ""} '
        f'{", ".join(bad) or "(none found on a second read)"} ({e.message.splitlines()[0][:200]}); '
        f'rebuild the dataset: {build.command(builder, overwrite=True)}') from None


def _decode(example):
  """Decodes the images and masks that as_dataset left encoded."""
  for side in features.SIDES:
    s = example[side]
    s['image'] = tf.io.decode_image(s['image'], channels=3, expand_animations=False)
    hw = tf.shape(s['image'])[:2]
    s['masks'] = tf.cond(  # map_fn cannot stack zero masks (PF-PASCAL, PF-WILLOW have none)
        tf.size(s['masks']) > 0,
        lambda: tf.map_fn(lambda png: tf.io.decode_png(png, channels=1), s['masks'],
                          fn_output_signature=tf.TensorSpec([None, None, 1], tf.uint8)),
        lambda: tf.zeros([0, hw[0], hw[1], 1], tf.uint8))
  return example


def _pad_to(x, size, axis, name, pair_id):
  """Pads dimension `axis` of x with zeros up to `size`; fails (naming the pair) if it is larger."""
  n = tf.shape(x)[axis]
  check = tf.debugging.Assert(n <= size, [
      'pair', pair_id, f'has more {name} than config.input.max_{name}={size}:', n])
  with tf.control_dependencies([check]):
    paddings = [[0, 0]] * len(x.shape)
    paddings[axis] = [0, size - n]
    return tf.pad(x, paddings)


def full_resolution(config: ml_collections.ConfigDict, train: bool = False) -> int:
  """The side of `image_full`, the view KBC cuts its crops from: the network input enlarged by
  kbc.max_scale, the most a crop enlarges (0 when KBC is off: kbc.eval at evaluation, kbc.train_prob in
  training). Training crops cut from it look as the evaluation's do."""
  use = config.kbc.train_prob if train else config.kbc.eval
  return round(config.kbc.max_scale * config.input.image_size) if use else 0


def _resize(image, size: int, keep_aspect: bool):
  """float [H, W, C] -> [size, size, C] stretched (or letterboxed), and the scale (sx, sy)."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale_yx = size / hw
  if keep_aspect:  # Letterbox: one scale, pad bottom and right.
    scale_yx = tf.fill([2], tf.reduce_min(scale_yx))
  new_hw = tf.cast(tf.round(hw * scale_yx), tf.int32)
  image = tf.image.resize(image, new_hw, method='bilinear', antialias=True)
  return tf.image.pad_to_bounding_box(image, 0, 0, size, size), scale_yx[::-1]


def preprocess_side(side, pair_id, config: ml_collections.ConfigDict, full_size: int = 0):
  """Resizes (and pads) one decoded side to config.input.image_size; pads instances and keypoints. With
  `full_size`, also the same view at full_size px (`image_full`, for KBC at evaluation)."""
  size = config.input.image_size
  image, scale = _resize(tf.cast(side['image'], tf.float32), size, config.input.keep_aspect)
  new_hw = tf.cast(tf.round(tf.cast(tf.shape(side['image'])[:2], tf.float32) * scale[::-1]), tf.int32)

  num_instances = tf.shape(side['instance_ids'])[0]
  valid = side['keypoint_visible']
  keypoints = tf.where(valid[..., None], side['keypoints'] * scale, 0.)
  masks = tf.image.resize(side['masks'], new_hw, method='nearest')
  masks = tf.image.pad_to_bounding_box(masks, 0, 0, size, size)[..., 0] > 0
  has_masks = tf.shape(masks)[0] > 0
  masks = tf.cond(has_masks, lambda: masks, lambda: tf.zeros([num_instances, size, size], tf.bool))

  max_i, max_k = config.input.max_instances, config.input.max_keypoints
  pad_i = lambda x: _pad_to(x, max_i, 0, 'instances', pair_id)
  pad_ik = lambda x: _pad_to(pad_i(x), max_k, 1, 'keypoints', pair_id)
  out = {
      'image': image,
      'keypoints': pad_ik(keypoints),
      'keypoint_valid': pad_ik(valid),
      'bboxes': pad_i(side['bboxes'] * tf.tile(scale, [2])),
      'instance_valid': pad_i(tf.ones([num_instances], tf.bool)),
      'masks': pad_i(masks),
      'has_masks': has_masks,
      'scale': scale,
  }
  out['keypoints'].set_shape([max_i, max_k, 2])
  out['keypoint_valid'].set_shape([max_i, max_k])
  out['bboxes'].set_shape([max_i, 4])
  out['instance_valid'].set_shape([max_i])
  out['masks'].set_shape([max_i, size, size])
  max_p = config.input.get('max_dense_points', 0)
  if max_p:  # zero slots for datasets without dense points: the loss then uses the keypoints alone
    dense_valid = side.get('dense_visible', tf.zeros([num_instances, 0], tf.bool))
    dense = side.get('dense_points', tf.zeros([num_instances, 0, 2]))
    pad_ip = lambda x: _pad_to(pad_i(x), max_p, 1, 'dense_points', pair_id)
    out['dense_points'] = pad_ip(tf.where(dense_valid[..., None], dense * scale, 0.))
    out['dense_valid'] = pad_ip(dense_valid)
    out['dense_points'].set_shape([max_i, max_p, 2])
    out['dense_valid'].set_shape([max_i, max_p])
  if full_size:
    out['image_full'], _ = _resize(tf.cast(side['image'], tf.float32), full_size, config.input.keep_aspect)
  return out


def preprocess(example, *, config: ml_collections.ConfigDict, train: bool, index=None):
  """Decoded example -> one fixed-shape training/eval example (see the module docstring). Training
  examples are augmented (misc_jax/augment.py) as config.input.augment says, from seeds of
  (config.seed, index)."""
  out = {'category': tf.cast(example['category'], tf.int32), 'valid': tf.constant(True)}
  if 'attributes' in example:
    out['attributes'] = {k: tf.cast(v, tf.int32) for k, v in example['attributes'].items()}
  aug = config.input.augment
  for i, side in enumerate(features.SIDES):
    seed = augment.stateless_seed(config.seed, 0 if index is None else index, i)
    other_seed = lambda k: tf.random.experimental.stateless_fold_in(seed, k)
    decoded = example[side]
    if train and aug.box_crop:
      decoded = augment.box_crop(decoded, other_seed(1), aug.box_crop)
    out[side] = preprocess_side(decoded, example['pair_id'], config, full_resolution(config, train))
    for view in ('image', 'image_full') if 'image_full' in out[side] else ('image',):  # the same draws
      if train and aug.photometric:
        out[side][view] = augment.photometric(out[side][view], seed, aug)
      if train and aug.cats_colour:
        out[side][view] = augment.cats_colour(out[side][view], other_seed(2), aug.cats_colour)
      out[side][view] = tf.cast(tf.round(out[side][view]), tf.uint8)
  return out


def _load(config, process_split):
  builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
  decoders = {side: {'image': _SKIP, 'masks': _SKIP} for side in features.SIDES}
  read_config = tfds.ReadConfig(shuffle_seed=config.seed, interleave_cycle_length=1)
  ds = builder.as_dataset(split=process_split, decoders=decoders, read_config=read_config,
                          shuffle_files=False)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = decoding_threads(config)
  return ds.with_options(options), builder


def _graph(fn):
  """A dataset function traced as it is written: it has no Python control flow on tensors for AutoGraph to
  convert, and converting it took most of the pipeline's start-up time (~8 s per dataset)."""
  return tf.autograph.experimental.do_not_convert(fn)


def decoding_threads(config: ml_collections.ConfigDict) -> int:
  """The threads that decode and preprocess: config.input.decoding_threads, or every core this process may
  run on (its CPU affinity: a container's or SLURM's allotment, not the machine's). An accelerator needs
  several cores per chip (docs/performance.md)."""
  return config.input.get('decoding_threads') or len(os.sched_getaffinity(0))


def _per_process_batch(config):
  batch, procs = config.batch_size, jax.process_count()
  if batch % procs:
    raise ValueError(f'config.batch_size={batch} is not divisible by the {procs} processes')
  return batch // procs


def _train_shard(config, split, shard: int, num_shards: int, batch_size: int, start_step: int):
  """Batches of one data shard from `start_step` on: epochs each shuffled by a seed of (seed, epoch),
  the records before the start skipped within its epoch, decoded and preprocessed."""
  records, builder = _load(config, split)
  n = builder.info.splits[split].num_examples
  epoch, offset = divmod(start_step * batch_size, n)
  shuffled = lambda e: records.shuffle(config.input.shuffle_buffer, seed=config.seed * 1_000_003 + e)
  ds = tf.data.Dataset.range(epoch, sys.maxsize).flat_map(shuffled)
  ds = ds.enumerate(start=epoch * n).skip(offset)  # skipping still-encoded records of one epoch is cheap
  index = lambda i: i * num_shards + shard  # augmentation seed, unique across shards
  ds = ds.map(_graph(lambda i, ex: preprocess(_decode(ex), config=config, train=True, index=index(i))),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True)


def train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0,
                   steps_per_batch: int = 0) -> Iterator[dict]:
  """Endless training batches of this process's pairs from step `start_step` on; with
  `steps_per_batch` = k, the batches of k consecutive steps stacked [k, B_process, ...] (for
  train.train_steps).

  The split is cut into `config.input.data_shards` even shards (the number of processes when unset);
  a global batch is the concatenation of one batch from each shard in order, and each process reads only
  its own shards. So the global batches depend on data_shards, never on how many processes share them:
  one process with data_shards=2 trains on exactly what two processes do.
  """
  num_shards = config.input.data_shards or jax.process_count()
  procs = jax.process_count()
  if num_shards % procs or config.batch_size % num_shards:
    raise ValueError(f'config.input.data_shards={num_shards} must be a multiple of the {procs} '
                     f'processes and divide config.batch_size={config.batch_size}')
  per_process, per_shard = num_shards // procs, config.batch_size // num_shards
  _per_process_batch(config)  # checks the split over processes
  splits = tfds.even_splits(config.dataset.train_split, n=num_shards, drop_remainder=True)
  mine = range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  streams = [_train_shard(config, splits[s], s, num_shards, per_shard, start_step) for s in mine]
  ds = tf.data.Dataset.zip(tuple(streams)).map(_graph(
      lambda *b: tf.nest.map_structure(lambda *x: tf.concat(x, 0), *b)))
  if steps_per_batch:
    ds = ds.batch(steps_per_batch, drop_remainder=True)  # [k, B_process, ...]
  return _named_damage(iter(tfds.as_numpy(ds.prefetch(tf.data.AUTOTUNE))), config, config.dataset.train_split)


def eval_iterator(config: ml_collections.ConfigDict, split: str) -> Iterator[dict]:
  """One pass over `split` in order; the last batches are padded (valid=False) so every process runs
  the same number of steps, ceil(ceil(N / processes) / per-process batch)."""
  batch_size = _per_process_batch(config)
  ds, builder = _load(config, tfds.split_for_jax_process(split, drop_remainder=False))
  total = builder.info.splits[split].num_examples
  num_batches = math.ceil(math.ceil(total / jax.process_count()) / batch_size)
  ds = ds.map(_graph(lambda ex: preprocess(_decode(ex), config=config, train=False)),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

  def padded():
    it = iter(tfds.as_numpy(ds))
    template = None
    for _ in range(num_batches):
      batch = next(it, None)
      if template is None:
        template = batch
      if batch is None:  # This process ran out before another one: a fully padded batch.
        batch = jax.tree.map(lambda x: np.zeros_like(x[:0]), template)
      n = len(batch['valid'])
      yield jax.tree.map(lambda x: np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:],
                                                                   x.dtype)]), batch)

  return _named_damage(padded(), config, split)
