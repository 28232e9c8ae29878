"""TFDS's own builder checks on the tiny config: generation, exact split counts, features."""

import tensorflow_datasets as tfds

from tfds_builders.synthetic_misc import synthetic_misc_dataset_builder


class SyntheticMiscTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = synthetic_misc_dataset_builder.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['tiny']
  SPLITS = {'train': 6, 'validation': 3, 'test': 3}
  SKIP_CHECKSUMS = True


if __name__ == '__main__':
  tfds.testing.test_main()
