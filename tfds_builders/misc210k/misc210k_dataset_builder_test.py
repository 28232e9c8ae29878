"""TFDS's own builder checks on dummy_data/ (values: tests/test_real_datasets.py)."""

import tensorflow_datasets as tfds

from tfds_builders.misc210k import misc210k_dataset_builder


class Misc210kTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = misc210k_dataset_builder.Builder
  SPLITS = {'train': 8, 'validation': 2, 'test': 2}  # dog: 3 images x 2; person: 2 x 1; held out: 2 x 1
  SKIP_CHECKSUMS = True


if __name__ == '__main__':
  tfds.testing.test_main()
