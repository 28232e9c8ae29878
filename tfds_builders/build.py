r"""Builds a misc_jax dataset into TFDS records (the `tfds build` CLI needs apache_beam; this does not).

  python -m tfds_builders.build synthetic_misc/default --data_dir ~/tensorflow_datasets
  python -m tfds_builders.build misc210k --manual_dir ~/data/MISC210K --data_dir ~/tensorflow_datasets

Afterwards `tfds.load('<name>/<config>', data_dir=...)` works in any process that imported
`tfds_builders.<name>`.
"""

import importlib
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: $TFDS_DATA_DIR or '
                                '~/tensorflow_datasets).')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Where the licensed archives were unpacked.')
_MAX_SHARD_SIZE = flags.DEFINE_integer('max_shard_size', 16 << 20, 'Largest shard, in bytes.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Rebuild even if the dataset exists.')


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Imports `tfds_builders.<dataset>` (registering it) and returns the builder for `name`.

  `name` is '<dataset>' or '<dataset>/<config>'.
  """
  dataset = name.split('/')[0]
  importlib.import_module(f'tfds_builders.{dataset}')
  return tfds.builder(name, data_dir=data_dir)


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None,
          max_shard_size: int = 16 << 20, overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Generates the dataset's records (a no-op when they exist, unless `overwrite`).

  Shards hold between `max_shard_size / 4` and `max_shard_size` bytes, so even the small synthetic splits
  come in several files that processes and readers can share.
  """
  builder = get_builder(name, data_dir)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  if manual_dir:
    manual_dir = os.path.expanduser(manual_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, max_shard_size=max_shard_size, min_shard_size=max_shard_size // 4,
      download_mode=mode,
      try_download_gcs=False))
  return builder


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m tfds_builders.build NAME[/CONFIG] [--data_dir ...]')
  builder = build(argv[1], _DATA_DIR.value, _MANUAL_DIR.value, _MAX_SHARD_SIZE.value,
                  _OVERWRITE.value)
  for split, info in builder.info.splits.items():
    logging.info('%s %s: %d examples in %d shards', builder.info.full_name, split,
                 info.num_examples, info.num_shards)
  logging.info('Records in %s', builder.data_dir)


if __name__ == '__main__':
  app.run(main)
