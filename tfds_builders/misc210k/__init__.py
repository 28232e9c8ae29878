"""MISC210K pairs from the COCO-format release, a manual download (`tfds.load('misc210k')`)."""

from tfds_builders.misc210k.misc210k_dataset_builder import Builder
