"""SPair-71k, a manual download (`tfds.load('spair71k')`)."""

from tfds_builders.spair71k.spair71k_dataset_builder import Builder
