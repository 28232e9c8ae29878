r"""Draws evaluation pairs before and after KBC cropping (one row each), e.g. for docs/kbc.md:

  python -m misc_jax.tools.kbc_figure --config configs/synthetic.py \
      --config.dataset.name=synthetic_misc/small_objects --config.dataset.eval_split=test \
      --out docs/kbc_crop.png

The crops here use the ground-truth target keypoints; at evaluation the target crop comes from the
model's first pass (misc_jax/kbc.py).
"""

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from misc_jax import cli
from misc_jax import input_pipeline
from misc_jax import kbc
from misc_jax import visualize
from misc_jax.models import supervision
from tfds_builders import build

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
_OUT = cli.DEFINE_path('out', None, 'PNG to write.')
_PAIRS = flags.DEFINE_integer('pairs', 2, 'How many pairs to draw.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  del argv
  config = _CONFIG.value
  builder = build.build(config.dataset.name, config.dataset.data_dir)
  batch = next(input_pipeline.eval_iterator(config, config.dataset.eval_split))
  batch = jax.tree.map(lambda x: x[:_PAIRS.value], batch)
  src_kps, src_valid, trg_kps, valid, _ = supervision.instance_targets(batch)
  crops = dict(zip(('source', 'target'), kbc.ground_truth_crops(
      src_kps, src_valid, trg_kps, valid, config.input.image_size, config.kbc)))
  cropped = dict(batch, **{side: kbc.crop_side(batch[side], crops[side]) for side in crops})
  # Rows: pair 0, pair 0 cropped, pair 1, pair 1 cropped, ...
  rows = jax.tree.map(lambda a, c: np.stack([a, np.asarray(c)], 1).reshape((-1,) + a.shape[1:]),
                      batch, cropped)
  visualize.save_pairs(rows, _OUT.value, num_pairs=2 * len(src_kps),
                       category_names=builder.info.features['category'].names)
  print(f'Wrote {_OUT.value}; source scales {np.round(crops["source"].scale, 2)}, target scales '
        f'{np.round(crops["target"].scale, 2)}')


if __name__ == '__main__':
  app.run(main)
