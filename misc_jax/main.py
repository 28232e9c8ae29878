r"""The main job: python -m misc_jax.main --config configs/synthetic.py --workdir runs/demo

Today it prepares the data end to end: builds the configured TFDS dataset if it is missing, writes the
resolved config to `workdir/config.json`, runs one batch through the input pipeline and draws it to
`workdir/data_preview.png`. Training and evaluation (misc_jax/train.py) are not implemented yet.
"""

import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags
import tensorflow as tf

from misc_jax import input_pipeline
from misc_jax import visualize
from tfds_builders import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where config, logs, checkpoints and plots go.')
flags.mark_flags_as_required(['config', 'workdir'])


def prepare_data(config, workdir: str) -> None:
  """Builds the dataset if needed and draws the first training batch."""
  builder = build.build(config.dataset.name, config.dataset.data_dir)
  for split, info in builder.info.splits.items():
    logging.info('%s %s: %d pairs', builder.info.full_name, split, info.num_examples)
  batch = next(input_pipeline.train_iterator(config, to_device=False))
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'data_preview.png')
    visualize.save_pairs(batch, path, category_names=builder.info.features['category'].names)
    logging.info('Wrote %s', path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; the accelerators belong to JAX.
  config, workdir = _CONFIG.value, _WORKDIR.value
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
  prepare_data(config, workdir)
  logging.warning('Training is not implemented yet (misc_jax/train.py arrives with the training '
                  'issue); the data is ready in %s.', config.dataset.data_dir or 'the TFDS data dir')


if __name__ == '__main__':
  app.run(main)
