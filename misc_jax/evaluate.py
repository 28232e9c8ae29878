r"""Evaluates a run's checkpoint on any built dataset and split, with that benchmark's PCK protocol.

  python -m misc_jax.evaluate --workdir runs/demo --dataset synthetic_misc/small_objects --split test
  misc-jax-evaluate --workdir runs/kbcnet_pfpascal --dataset pf_willow --split test --checkpoint best

Writes a JSON report (default: WORKDIR/eval/<dataset>_<split>_step<N>.json) and the per-category table
(the same name, .md), and prints both; `--plot PNG` draws the first batch, `--set FIELD=VALUE` overrides
a field of the run's config. The threshold follows the dataset (REFERENCE.md section 4): the image size
for PF-PASCAL, the target (instance) box otherwise; `--threshold` overrides it. The evaluator is the
run's (`config.eval.evaluator`: `pck`, or `misc` for the dual-path model; `--set eval.evaluator=misc`
reads a KBCNet run on the dual path's instance pairs). `--kbc` adds KBC's second pass (KBCNet only).
"""

import ast
import json
import re

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
import tensorflow as tf

from misc_jax import cli
from misc_jax import rundir
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from tfds_builders import build


# The PCK threshold of each benchmark (REFERENCE.md section 4); others use the target box. PF-WILLOW is
# also scored with CHM's padded-keypoint rule, the one the peers' published numbers use (ops/pck.py).
THRESHOLDS = {'pf_pascal': 'image'}
EXTRA_THRESHOLDS = {'pf_willow': ('chm',)}


def evaluate(workdir: str, *, checkpoint: str = 'latest', dataset: str | None = None,
             split: str = 'test', data_dir: str | None = None, threshold: str | None = None,
             kbc: bool | None = None, overrides: dict | None = None, plot: str | None = None) -> dict:
  """The report of one checkpoint on one split: {'step', 'dataset', 'split', 'threshold', metrics...}.

  `overrides` sets dotted config fields ({'eval.objectness_threshold': 0.4}); `plot` writes the
  evaluator's picture of the first batch there.
  """
  config = rundir.read_config(workdir)
  for key, value in (overrides or {}).items():
    set_field(config, key, value)
  config.dataset.name = dataset or config.dataset.name
  config.dataset.data_dir = data_dir or config.dataset.data_dir
  benchmark = config.dataset.name.split('/')[0]
  config.eval.threshold = threshold or THRESHOLDS.get(benchmark, 'bbox')
  config.eval.extra_thresholds = EXTRA_THRESHOLDS.get(benchmark, ())
  if kbc is not None:
    config.kbc.eval = kbc
  builder = build.get_builder(config.dataset.name, config.dataset.data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'{config.dataset.name} is not built in {builder.data_dir}; build it with: '
                            f'{build.command(builder)}')
  try:
    builder.info.splits[split]  # a name, or a slice of one: 'train[:200]', 'test[50%:]'
  except ValueError as e:
    raise ValueError(f'{config.dataset.name} has no split {split!r}; it has {list(builder.info.splits)}, '
                     'and slices of them such as "train[:200]"') from e
  config, model_module, state, step = state_lib.load_run(workdir, checkpoint, config)
  names = builder.info.features['category'].names
  evaluator = train.evaluator_for(config, model_module, split, names, sharding.make_mesh(ml_collections.ConfigDict()))
  metrics, first = evaluator.evaluate(state)
  if plot:
    evaluator.plot(first, plot)
  options = {**({'threshold': threshold} if threshold else {}), **({'kbc': kbc} if kbc is not None else {}),
             **(overrides or {})}
  return {'step': int(step), 'dataset': config.dataset.name, 'split': split,
          'threshold': config.eval.threshold, 'kbc': bool(config.kbc.eval), 'options': options, **metrics}


def set_field(config, key: str, value) -> None:
  """config[key] = value for a dotted key; a key that names no field is refused with the valid ones."""
  *parents, leaf = key.split('.')
  node = config
  for depth, part in enumerate(parents + [leaf]):
    fields = sorted(node.keys()) if hasattr(node, 'keys') else []
    if part not in fields:
      where = 'config' + ''.join(f'.{p}' for p in (parents + [leaf])[:depth])
      raise ValueError(f'--set {key}: {where} has no field {part!r}; its fields: {", ".join(fields)}')
    if depth < len(parents):
      node = node[part]
  node[leaf] = value


def report_name(report: dict) -> str:
  """The default file name of a report: <dataset>_<split>_step<N>, then the options that changed the
  evaluation (--threshold, --kbc, --set), so that evaluations with other options do not overwrite it."""
  safe = lambda s: re.sub(r'[^\w.=-]+', '_', str(s)).strip('_')  # 'train[:200]' -> 'train_200'
  options = ''.join(f'_{safe(k)}={safe(v)}' for k, v in sorted(report.get('options', {}).items()))
  return f'{safe(report["dataset"])}_{safe(report["split"])}_step{report["step"]}{options}.json'


def category_table(report: dict) -> str:
  """The per-category PCK as a Markdown table."""
  rows = report.get('per_category', {})
  if not rows:
    return ''
  keys = [k for k in next(iter(rows.values())) if k.startswith('pck')]
  lines = ['| category | pairs | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 2) + '|']
  for name, row in rows.items():
    lines.append(f'| {name} | {row["num_pairs"]} | ' + ' | '.join(f'{100 * row[k]:.1f}' for k in keys) + ' |')
  return '\n'.join(lines)


def _define_flags():
  """The command's flags (defined only when it runs: tests import this module)."""
  cli.DEFINE_path('workdir', None, 'The run to evaluate (holds config.json and checkpoints).')
  flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.")
  flags.DEFINE_string('dataset', None, 'A built TFDS dataset, e.g. pf_willow (default: the run\'s).')
  flags.DEFINE_string('split', 'test', 'The split to evaluate, or a slice of it ("train[:200]").')
  cli.DEFINE_path('data_dir', None, 'TFDS data dir (default: the run\'s).')
  flags.DEFINE_enum('threshold', None, ['bbox', 'image'], 'PCK threshold (default: by dataset).')
  flags.DEFINE_bool('kbc', None, 'KBC second pass at evaluation (default: the run\'s config.kbc.eval).')
  cli.DEFINE_path('output', None, 'Report path (default: WORKDIR/eval/...).')
  cli.DEFINE_path('plot', None, 'Also draw the first batch\'s predictions to this PNG.')
  flags.DEFINE_multi_string('set', [], 'FIELD=VALUE: override a config field, e.g. '
                            'eval.objectness_threshold=0.4 or kbc.max_scale=3.')
  flags.mark_flags_as_required(['workdir'])


def parse_override(item: str):
  """'eval.objectness_threshold=0.4' -> ('eval.objectness_threshold', 0.4); non-literals stay strings."""
  key, sep, value = item.partition('=')
  if not sep:
    raise app.UsageError(f'--set {item!r}: expected FIELD=VALUE')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  tf.config.set_visible_devices([], 'GPU')
  overrides = dict(parse_override(item) for item in f.set)
  report = evaluate(f.workdir, checkpoint=f.checkpoint, dataset=f.dataset, split=f.split,
                    data_dir=f.data_dir, threshold=f.threshold, kbc=f.kbc, overrides=overrides,
                    plot=f.plot)
  output = epath.Path(f.output or epath.Path(f.workdir) / 'eval' / report_name(report))
  if jax.process_index() == 0:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    table = category_table(report)
    if table:
      output.with_suffix('.md').write_text(table + '\n')
    summary = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    print(json.dumps(summary, indent=2))
    print(table)
  logging.info('Wrote %s (and the per-category table next to it)', output)


def run():
  """The misc-jax-evaluate console script."""
  cli.run(main, _define_flags, __name__)


if __name__ == '__main__':
  run()
