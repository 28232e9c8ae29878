r"""Tunes KBC's settings on a validation split of a trained run: every combination of the values given.

  python -m misc_jax.tools.sweep_kbc --workdir runs/kbcnet_spair --split validation \
      --max_scale 2,2.5,3 --coarse_radius 0,0.5 --passes 1,3 --fill 0.65,0.8 --small_threshold 0.3,0.5

KBC's settings are not given by the paper; the configs' values were chosen on the synthetic data's
validation split and must be tuned on each benchmark's validation split (never its test split) before a
test number is reported. On the synthetic demo `coarse_radius` and `passes` mattered most (docs/kbc.md).
Writes WORKDIR/eval/kbc_sweep_<split>.md (a table, best PCK@0.1 first, with KBC off for reference) and the
same as JSON; then set the best values in the config or with `--config.kbc.<field>=...`.
"""

import itertools
import json

from absl import app
from absl import flags
from etils import epath
import jax
import ml_collections
import tensorflow as tf
import tqdm

from misc_jax import cli
from misc_jax import rundir
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from tfds_builders import build

FIELDS = ('max_scale', 'coarse_radius', 'passes', 'fill', 'margin', 'small_threshold')
_INTEGER = ('passes',)


def sweep(workdir: str, split: str, values: dict, checkpoint: str = 'latest',
          data_dir: str | None = None) -> list[dict]:
  """[{'kbc': False or the settings, 'pck@a': ...}, ...]: KBC off, then each combination of `values`
  ({field: [value, ...]}; fields left out keep the run's value)."""
  config = rundir.read_config(workdir)
  config.dataset.data_dir = data_dir or config.dataset.data_dir
  config, model_module, state, _ = state_lib.load_run(workdir, checkpoint, config)
  names = build.get_builder(config.dataset.name, config.dataset.data_dir).info.features['category'].names
  mesh = sharding.make_mesh(ml_collections.ConfigDict())  # data parallel over every device
  grid = [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
  rows = []
  for settings in tqdm.tqdm([None] + grid, desc='kbc sweep'):
    c = config.copy_and_resolve_references()
    c.kbc.eval = settings is not None
    c.kbc.update(settings or {})
    metrics, _ = train.evaluator_for(c, model_module, split, names, mesh).evaluate(state)
    rows.append({'kbc': settings or False,
                 **{k: v for k, v in metrics.items() if k.startswith('pck@') or k == 'num_pairs'}})
  return rows


def table(rows: list[dict]) -> str:
  """The rows as Markdown, KBC off first, then by PCK@0.1, best first."""
  keys = [k for k in rows[0] if k.startswith('pck@')]
  order = [rows[0]] + sorted(rows[1:], key=lambda r: -r.get('pck@0.1', 0.))
  lines = ['| ' + ' | '.join(FIELDS + tuple(keys)) + ' |', '|---' * (len(FIELDS) + len(keys)) + '|']
  for row in order:
    settings = ([str(row['kbc'].get(f, '')) for f in FIELDS] if row['kbc']
                else ['KBC off'] + [''] * (len(FIELDS) - 1))
    lines.append('| ' + ' | '.join(settings) + ' | ' + ' | '.join(f'{100 * row[k]:.2f}' for k in keys) + ' |')
  return '\n'.join(lines)


def _define_flags():
  cli.DEFINE_path('workdir', None, 'A trained run.')
  flags.DEFINE_string('split', 'validation', 'A validation split (never the test split).')
  flags.DEFINE_string('checkpoint', 'best', "'latest', 'best' or a step number.")
  cli.DEFINE_path('data_dir', None, 'TFDS data dir (default: the run\'s).')
  for field in FIELDS:
    flags.DEFINE_list(field, None, f'Values of config.kbc.{field} to try (default: the run\'s).')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  tf.config.set_visible_devices([], 'GPU')
  values = {field: [(int if field in _INTEGER else float)(v) for v in getattr(f, field)]
            for field in FIELDS if getattr(f, field)}
  if not values:
    raise app.UsageError(f'give values for at least one of --{", --".join(FIELDS)}')
  rows = sweep(f.workdir, f.split, values, f.checkpoint, f.data_dir)
  if jax.process_index() == 0:
    out = epath.Path(rundir.absolute(f.workdir)) / 'eval' / f'kbc_sweep_{f.split}'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(rows, indent=2))
    out.with_suffix('.md').write_text(table(rows) + '\n')
    print(table(rows))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
