r"""KBCNet on DINOv2 ViT-B/14 features (frozen) on SPair-71k, with KBC at test time.

  python -m tfds_builders.build spair71k --manual_dir ~/data/SPair-71k  # once
  python -m misc_jax.tools.convert_dinov2 dinov2_vitb14_pretrain.pth ~/weights/vitb14.msgpack
  python -m misc_jax.main --config configs/dinov2_zero_shot.py:spair71k --workdir $RUNS/dinov2_zero_shot \
      --config.model.backbone_init=~/weights/vitb14.msgpack               # the untrained baseline
  python -m misc_jax.main --config configs/kbcnet_dinov2_spair.py --workdir $RUNS/kbcnet_dinov2_spair \
      --config.model.backbone_init=~/weights/vitb14.msgpack
  python -m misc_jax.tools.sweep_kbc --workdir $RUNS/kbcnet_dinov2_spair --split validation \
      --max_scale 1.5,2,2.5 --small_threshold 0.3,0.5                       # then evaluate test with KBC

What it should reach: between the zero-shot baseline of the same tokens (the command above) and the best
DINOv2-based method, GeoAware-SC's 85.6 SPair-71k PCK@0.1 (bbox, supervised); CATs' ResNet-101 reaches
49.9. Not measured here: neither the dataset nor the weights can be downloaded on our machines.
`:vits14` (or vitl14, vitg14, vitb14_reg, ...) picks another model; `:smoke` is the test variant (ViT-S/14
with random weights on 56 px synthetic pairs). Memory and speed: docs/performance.md, docs/backbones.md.
"""

from configs import common
from configs import kbcnet_spair
from configs import synthetic

# The blocks whose patch tokens CSFA aligns: a shallow, a middle and the last one, as the three ResNet
# scales of KBCNet.
BLOCKS = {'vits14': (5, 8, 11), 'vitb14': (5, 8, 11), 'vitl14': (11, 17, 23), 'vitg14': (19, 29, 39)}


def get_config(arg: str | None = None):
  if arg == 'smoke':
    config = common.use_dinov2(synthetic.get_config('smoke'), 'vits14', BLOCKS['vits14'])
    config.input.image_size = 56  # 4 x 4 patch tokens
    config.model.backbone_from_scratch = True  # random weights: tests only
    return config
  name = arg or 'vitb14'
  if name.split('_')[0] not in BLOCKS:
    raise ValueError(f'unknown config argument {arg!r}; expected smoke or a DINOv2 model such as vits14')
  config = common.use_dinov2(kbcnet_spair.get_config(), name, BLOCKS[name.split('_')[0]])
  config.input.image_size = 518  # the models' own resolution: a 37 x 37 grid of patch tokens
  config.optim.backbone_lr = 1e-6  # used only when fine-tuning (--config.model.freeze_backbone=False)
  return config
