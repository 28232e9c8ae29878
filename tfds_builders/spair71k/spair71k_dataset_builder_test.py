"""TFDS's own builder checks on dummy_data/ (values: tests/test_real_datasets.py)."""

import tensorflow_datasets as tfds

from tfds_builders.spair71k import spair71k_dataset_builder


class Spair71kTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = spair71k_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['large']
  SPLITS = {'train': 2, 'validation': 1, 'test': 2}
  SKIP_CHECKSUMS = True


if __name__ == '__main__':
  tfds.testing.test_main()
