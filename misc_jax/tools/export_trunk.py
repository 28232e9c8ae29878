r"""Exports a run's parameters, with their provenance, for `config.model.trunk_init`.

  python -m misc_jax.tools.export_trunk --workdir runs/pretrain --out misc_jax/assets/trunk.msgpack

The file is a msgpack of {'params': {module: tree}, 'batch_stats', 'provenance'}: the run's config
(JSON), the code's git commit when there is one, the step, and the training's wall time. A model takes
the modules its config.model.trunk_modules names (by default the trunk: backbone and CSFA), which must
have the same shapes; the rest of it starts fresh.
"""

import json
import subprocess

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax
import jax

from misc_jax import cli
from misc_jax import rundir
from misc_jax import state as state_lib
from misc_jax import visualize


def export(workdir: str, out: str, checkpoint: str = 'latest') -> dict:
  config, _, state, step = state_lib.load_run(workdir, checkpoint)
  params = jax.device_get(state.params)
  stats = jax.device_get(state.batch_stats)
  uptime = visualize.read_scalars(str(rundir.absolute(workdir))).get('uptime', [(step, float('nan'))])
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                            cwd=epath.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'
  provenance = {'config': config.to_json_best_effort(), 'commit': commit, 'step': int(step),
                'wall_time_s': float(uptime[-1][1]), 'workdir': str(workdir)}
  trunk = {'params': params, 'batch_stats': stats, 'provenance': json.dumps(provenance)}
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(flax.serialization.msgpack_serialize(trunk))
  logging.info('Wrote %s: the parameters of %s at step %d (%.0f s of training, commit %s).', path, workdir,
               step, provenance['wall_time_s'], commit)
  return trunk


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.checkpoint)


if __name__ == '__main__':
  cli.DEFINE_path('workdir', None, 'The run whose trunk is exported.')
  cli.DEFINE_path('out', None, 'The msgpack file to write.')
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.")
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
