r"""The default demo: the embedded synthetic multi-instance dataset, no download.

  python -m misc_jax.main --config configs/synthetic.py --workdir runs/demo
  python -m misc_jax.main --config configs/synthetic.py:smoke --workdir /tmp/smoke   # seconds, for tests

Today the job builds the dataset (about 50 s on 2 cores for `default`), writes the resolved config and
draws a batch of pairs to `workdir/data_preview.png`; training KBCNet arrives with the training issue.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8  # global, across all processes and devices

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'synthetic_misc/default'
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: $TFDS_DATA_DIR
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'

  config.input = ml_collections.ConfigDict()
  config.input.image_size = 256
  config.input.keep_aspect = False  # False: stretch to a square, as the peers do for PCK
  config.input.max_instances = 4
  config.input.max_keypoints = 12
  config.input.shuffle_buffer = 512
  config.input.prefetch = 2
  config.input.augment = ml_collections.ConfigDict()
  config.input.augment.photometric = True
  config.input.augment.brightness = 0.1  # max delta, images in [0, 1]
  config.input.augment.contrast = 0.2    # factor range 1 +- this
  config.input.augment.saturation = 0.2

  if arg == 'smoke':
    config.dataset.name = 'synthetic_misc/tiny'
    config.batch_size = 8
    config.input.image_size = 64
    config.input.max_instances = 3
    config.input.shuffle_buffer = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; expected "smoke" or nothing')
  return config
