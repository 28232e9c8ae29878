r"""Exports a run's parameters, with their provenance, for `config.model.trunk_init`.

  python -m misc_jax.tools.export_trunk --workdir runs/pretrain --out misc_jax/assets/trunk.msgpack

The file is a msgpack of {'params': {module: tree}, 'batch_stats', 'provenance'}: the run's config as it
began (JSON), the git commit it began with, the step, the training's wall time, and `started_from`: the
same record for every stage the run started from (its `model.trunk_init` file's provenance, its
`model.init_from` run's, and so on back to a run from scratch), so a chain of runs lives in the file. A
model takes the modules its config.model.trunk_modules names (by default the trunk: backbone and CSFA),
which must have the same shapes; the rest of it starts fresh.
"""

import json

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


def run_record(workdir, step: int | None = None) -> dict:
  """A run's provenance: its config as it began, the commit it began with, the step (default: its newest
  checkpoint), its wall time up to then, and the records of the stages it started from."""
  config = rundir.read_config(workdir)
  step = rundir.newest_step(rundir.absolute(workdir) / 'checkpoints') if step is None else step
  uptime = visualize.read_scalars(str(rundir.absolute(workdir))).get('uptime', [])
  wall = [t for s, t in uptime if s <= step]
  return {'config': config.to_json_best_effort(), 'commit': rundir.run_commit(workdir), 'step': int(step),
          'wall_time_s': float(wall[-1]) if wall else float('nan'), 'workdir': str(workdir),
          'started_from': started_from(config)}


def started_from(config) -> list[dict]:
  """The provenance of what a run's config starts from: a trunk_init file's own, an init_from run's."""
  m = config.model
  origins = []
  if m.get('trunk_init'):
    origins.append(json.loads(state_lib.load_trunk(m.trunk_init).get('provenance', '{}')))
  if m.get('init_from'):
    checkpoint = m.get('init_from_checkpoint', 'latest')
    record = run_record(m.init_from, checkpoint if isinstance(checkpoint, int) else None)
    origins.append(dict(record, checkpoint=checkpoint))  # 'best': the step field is the newest, not it
  return origins


def export(workdir: str, out: str, checkpoint: str = 'latest') -> dict:
  _, _, state, step = state_lib.load_run(workdir, checkpoint)
  params = jax.device_get(state.params)
  stats = jax.device_get(state.batch_stats)
  provenance = run_record(workdir, step)
  trunk = {'params': params, 'batch_stats': stats, 'provenance': json.dumps(provenance)}
  path = epath.Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(flax.serialization.msgpack_serialize(trunk))
  logging.info('Wrote %s: the parameters of %s at step %d (%.0f s of training, commit %s; %d earlier '
               'stages recorded).', path, workdir, step, provenance['wall_time_s'], provenance['commit'],
               len(provenance['started_from']))
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
