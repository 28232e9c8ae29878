"""PF-WILLOW, a manual download (`tfds.load('pf_willow')`)."""

from tfds_builders.pf_willow.pf_willow_dataset_builder import Builder
