r"""The main job: python -m misc_jax.main --config configs/synthetic.py --workdir runs/demo

Builds the configured dataset if it is missing, writes the resolved config to `workdir/config.json`, a
preview of the training data to `workdir/data_preview.png`, then trains and evaluates
(misc_jax/train.py). Override any field: `--config.optim.lr=1e-4`.

Several processes (one per host, or per GPU): `--multihost` lets `jax.distributed.initialize()` read the
cluster from the environment (Cloud TPU, SLURM, ...); `--coordinator_address`, `--num_processes` and
`--process_id` set it explicitly (e.g. two processes on one machine, over loopback).
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags
import tensorflow as tf

from misc_jax import input_pipeline
from misc_jax import train
from misc_jax import visualize
from tfds_builders import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where config, logs, checkpoints and plots go.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Initialise jax.distributed from the environment.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --coordinator_address.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax_info(record) -> bool:
  """Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def init_distributed() -> None:
  if _COORDINATOR.value:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # only used on CPU
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def preview_data(config, workdir: str) -> None:
  """Builds the dataset if needed and draws the first training batch."""
  builder = build.build(config.dataset.name, config.dataset.data_dir)
  for split, info in builder.info.splits.items():
    logging.info('%s %s: %d pairs', builder.info.full_name, split, info.num_examples)
  batch = next(input_pipeline.train_iterator(config, to_device=False))
  path = os.path.join(workdir, 'data_preview.png')
  visualize.save_pairs(batch, path, category_names=builder.info.features['category'].names)
  logging.info('Wrote %s', path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # TF only reads data; the accelerators belong to JAX.
  logging.get_absl_handler().addFilter(_quiet_orbax_info)
  init_distributed()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
    preview_data(config, workdir)
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
