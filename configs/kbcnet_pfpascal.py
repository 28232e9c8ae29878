r"""KBCNet-R101 on PF-PASCAL (image PCK), the CHM/CATs flavour of the data.

  python -m tfds_builders.build pf_pascal/chm --manual_dir ~/data/PF-PASCAL  # once
  python -m misc_jax.main --config configs/kbcnet_pfpascal.py --workdir runs/kbcnet_pfpascal \
      --config.model.backbone_init=~/weights/resnet101.msgpack
  python -m misc_jax.tools.sweep_kbc --workdir runs/kbcnet_pfpascal --split validation \
      --max_scale 1.5,2,2.5 --small_threshold 0.3,0.5                        # tune KBC, then:
  misc-jax-evaluate --workdir runs/kbcnet_pfpascal --checkpoint best --split test --kbc --set kbc...=...

What it should reach: the peers' PF-PASCAL test PCK@0.05 / @0.1 (image) is 75-85 / 91-94 (CATs, CHM,
CATs++). Not yet measured here: the dataset cannot be downloaded on our machines.
"""

from configs import kbcnet_spair


def get_config(arg: str | None = None):
  config = kbcnet_spair.get_config(arg)  # the same recipe (docs/reproduction.md), on PF-PASCAL
  config.dataset.name = 'pf_pascal/chm'
  config.input.image_size = 256  # CATs' input; CHM uses 240
  config.input.max_keypoints = 20
  config.model.feature_stride = 16  # a 16 x 16 grid, as CATs' features
  config.eval_every_steps = config.checkpoint_every_steps = 500  # 2,941 pairs: 92 steps an epoch
  config.eval.threshold = 'image'
  return config
