"""PF-PASCAL in its CHM/CATs and NC-Net flavours, a manual download (`tfds.load('pf_pascal/chm')`)."""

from tfds_builders.pf_pascal.pf_pascal_dataset_builder import Builder
