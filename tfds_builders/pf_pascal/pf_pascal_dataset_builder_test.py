"""TFDS's own builder checks on dummy_data/, which holds both flavours (values checked in
tests/test_real_datasets.py)."""

import tensorflow_datasets as tfds

from tfds_builders.pf_pascal import pf_pascal_dataset_builder


class PfPascalChmTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = pf_pascal_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['chm']
  SPLITS = {'train': 3, 'validation': 1, 'test': 2}
  SKIP_CHECKSUMS = True


class PfPascalNcnetTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = pf_pascal_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['ncnet']
  SPLITS = {'test': 2}
  SKIP_CHECKSUMS = True


if __name__ == '__main__':
  tfds.testing.test_main()
