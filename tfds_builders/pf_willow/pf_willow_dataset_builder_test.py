"""TFDS's own builder checks on dummy_data/ (values: tests/test_real_datasets.py)."""

import tensorflow_datasets as tfds

from tfds_builders.pf_willow import pf_willow_dataset_builder


class PfWillowTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = pf_willow_dataset_builder.Builder
  SPLITS = {'test': 3}
  SKIP_CHECKSUMS = True


if __name__ == '__main__':
  tfds.testing.test_main()
