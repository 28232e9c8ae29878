"""The synthetic multi-instance correspondence dataset (`tfds.load('synthetic_misc')`)."""

from tfds_builders.synthetic_misc.synthetic_misc_dataset_builder import Builder
