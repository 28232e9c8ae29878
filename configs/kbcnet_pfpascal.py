r"""KBCNet-R101 on PF-PASCAL (image PCK), the CHM/CATs flavour of the data.

  python -m tfds_builders.build pf_pascal/chm --manual_dir ~/data/PF-PASCAL  # once
  python -m misc_jax.main --config configs/kbcnet_pfpascal.py --workdir runs/kbcnet_pfpascal \
      --config.model.backbone_init=~/weights/resnet101.msgpack

What it should reach: the peers' PF-PASCAL test PCK@0.05 / @0.1 (image) is 75-85 / 91-94 (CATs, CHM,
CATs++). Not yet measured here: the dataset cannot be downloaded on our machines.
"""

from configs import common


def get_config(arg: str | None = None):
  config = common.kbcnet_config('kbcnet_r101', 'pf_pascal/chm', image_size=256)
  config.batch_size = 16
  config.total_steps = 20_000
  config.model.freeze_stages = 2
  config.eval.threshold = 'image'
  config.eval.best_metric = 'pck@0.1'
  if arg:
    raise ValueError(f'unknown config argument {arg!r}')
  return config
