r"""Builds a misc_jax dataset into TFDS records (the `tfds build` CLI needs apache_beam; this does not).

  python -m tfds_builders.build synthetic_misc/default --data_dir ~/tensorflow_datasets
  python -m tfds_builders.build misc210k --manual_dir ~/data/MISC210K --data_dir ~/tensorflow_datasets

Afterwards `tfds.load('<name>/<config>', data_dir=...)` works in any process that imported
`tfds_builders.<name>`.
"""

import dataclasses
import importlib
import math
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import shard_utils

from misc_jax import cli

SKIP_LOG = 'skipped_examples.tsv'


class _ShardConfig(shard_utils.ShardConfig):
  """Shards of at most max_shard_size bytes (as many as there are examples at most).

  TFDS 4.9.10 computes the shard count from its class defaults (64 MiB to 1 GiB) and ignores the sizes
  set in DownloadConfig, so every split of a small dataset came out as one shard.
  """

  def get_number_shards(self, total_size, num_examples, uses_precise_sharding=True):
    del uses_precise_sharding  # TFDS's writer shards by example count
    if self.num_shards:
      return self.num_shards
    total_size += num_examples * self.overhead
    return max(1, min(num_examples, math.ceil(total_size / self.max_shard_size)))


@dataclasses.dataclass
class _DownloadConfig(tfds.download.DownloadConfig):

  def get_shard_config(self):
    return _ShardConfig(max_shard_size=self.max_shard_size)


def datasets() -> list[str]:
  """The datasets of this package: its sub-packages."""
  here = os.path.dirname(os.path.abspath(__file__))
  return sorted(d for d in os.listdir(here) if os.path.exists(os.path.join(here, d, '__init__.py')))


def get_builder(name: str, data_dir: str | None = None, **kwargs) -> tfds.core.DatasetBuilder:
  """Imports `tfds_builders.<dataset>` (registering it) and returns the builder for `name`.

  `name` is '<dataset>' or '<dataset>/<config>'; `kwargs` go to the builder. An unknown dataset or
  config is refused with the valid names.
  """
  dataset, _, config_name = name.partition('/')
  if dataset not in datasets():
    raise ValueError(f'unknown dataset {dataset!r}; the datasets are {", ".join(datasets())}')
  module = importlib.import_module(f'tfds_builders.{dataset}')
  configs = [c.name for c in module.Builder.BUILDER_CONFIGS]
  if config_name and config_name not in configs:
    raise ValueError(f'{dataset} has no config {config_name!r}; its configs are '
                     f'{", ".join(configs) if configs else "(none: name the dataset alone)"}')
  return tfds.builder(name, data_dir=cli.expand(data_dir), **kwargs)


def build(name: str, data_dir: str | None = None, manual_dir: str | None = None,
          max_shard_size: int = 16 << 20, overwrite: bool = False,
          skip_bad_examples: bool = False) -> tfds.core.DatasetBuilder:
  """Generates the dataset's records (a no-op when they exist, unless `overwrite`).

  Shards hold at most `max_shard_size` bytes (16 MiB by default, so even the synthetic splits come in
  several files that processes and readers can share). With `skip_bad_examples` (real datasets
  only), pairs with bad inputs are left out and listed in `<records>/skipped_examples.tsv`.
  """
  kwargs = {'skip_bad_examples': True} if skip_bad_examples else {}
  builder = get_builder(name, data_dir, **kwargs)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  manual_dir = cli.expand(manual_dir)
  builder.download_and_prepare(download_config=_DownloadConfig(
      manual_dir=manual_dir, max_shard_size=max_shard_size, download_mode=mode,
      try_download_gcs=False))
  skipped = getattr(builder, 'skipped', [])
  if skipped:
    with open(os.path.join(builder.data_dir, SKIP_LOG), 'w') as f:
      f.write('split\tkey\treason\n')
      f.writelines(f'{split}\t{key}\t{reason}\n' for split, key, reason in skipped)
    logging.warning('Skipped %d bad examples; keys and reasons in %s', len(skipped),
                    os.path.join(builder.data_dir, SKIP_LOG))
  for line in shortfall(builder):
    logging.warning(line)
  return builder


def command(builder, overwrite: bool = False) -> str:
  """The shell command that builds `builder`'s dataset where the builder looks for it (with --manual_dir
  only for a dataset whose archives are downloaded by hand)."""
  parts = ['python -m tfds_builders.build', builder.info.full_name.rsplit('/', 1)[0],
           f'--data_dir {builder.data_dir_root}']
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    parts.append('--manual_dir DIR_OF_THE_ARCHIVES')
  if overwrite:
    parts.append('--overwrite')
  return ' '.join(parts)


def shortfall(builder) -> list[str]:
  """A line for each split with fewer pairs than the benchmark's official count (the builder's
  OFFICIAL_PAIRS, by config name): results on it are not comparable with published ones."""
  official = getattr(builder, 'OFFICIAL_PAIRS', {}).get(
      builder.builder_config.name if builder.builder_config else '', {})
  lines = []
  for split, count in official.items():
    have = builder.info.splits[split].num_examples if split in builder.info.splits else 0
    if have < count:
      lines.append(f'{builder.info.full_name} {split}: {have:,} pairs, {count - have:,} short of the '
                   f'official {count:,}')
  return lines


def _define_flags():
  """The command's flags (defined only when it runs: other modules import this one)."""
  cli.DEFINE_path('data_dir', None,
                      'TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).')
  cli.DEFINE_path('manual_dir', None, 'Where the licensed archives were unpacked.')
  flags.DEFINE_integer('max_shard_size', 16 << 20, 'Largest shard, in bytes.')
  flags.DEFINE_bool('overwrite', False, 'Rebuild even if the dataset exists.')
  flags.DEFINE_bool('skip_bad_examples', False,
                    'Skip pairs with bad inputs (missing or corrupt files, malformed annotations) instead '
                    'of failing; they are counted and listed in skipped_examples.tsv next to the records.')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m tfds_builders.build NAME[/CONFIG] [--data_dir ...]')
  f = flags.FLAGS
  builder = build(argv[1], f.data_dir, f.manual_dir, f.max_shard_size, f.overwrite, f.skip_bad_examples)
  for split, info in builder.info.splits.items():
    logging.info('%s %s: %d examples in %d shards', builder.info.full_name, split,
                 info.num_examples, info.num_shards)
  logging.info('Records in %s', builder.data_dir)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
