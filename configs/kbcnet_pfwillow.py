r"""Evaluates a PF-PASCAL-trained KBCNet on PF-WILLOW (bbox PCK), as the peers do: no training.

  python -m tfds_builders.build pf_willow --manual_dir ~/data/PF-WILLOW      # once
  python -m misc_jax.main --config configs/kbcnet_pfwillow.py --workdir runs/kbcnet_pfwillow \
      --config.model.init_from=runs/kbcnet_pfpascal

What it should reach: the peers' PF-WILLOW PCK@0.1 (bbox) is 76-81, measured with CHM's threshold, which
padded keypoint slots inflate (ops/pck.py); both thresholds are reported: `pck@0.1` (the extent of the
valid keypoints) and `pck_chm@0.1` (the peers'). Not yet measured here.
"""

from configs import kbcnet_pfpascal


def get_config(arg: str | None = None):
  config = kbcnet_pfpascal.get_config(arg)
  config.dataset.name = 'pf_willow'
  config.dataset.train_split = 'test'  # unused: total_steps = 0
  config.dataset.eval_split = 'test'
  config.total_steps = 0
  config.model.init_from_checkpoint = 'best'  # of the PF-PASCAL run, chosen on its validation split
  config.input.max_keypoints = 10
  config.eval.threshold = 'bbox'  # the extent of the valid keypoints (the builder's boxes)
  config.eval.extra_thresholds = ('chm',)  # and CHM's padded rule, which the peers' numbers use
  return config
