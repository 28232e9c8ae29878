r"""The default demo: KBCNet-tiny fine-tuned on the embedded synthetic dataset from a pretrained one.

  python -m misc_jax.main --config configs/synthetic.py --workdir runs/demo
  python -m misc_jax.main --config configs/synthetic.py:smoke --workdir /tmp/smoke   # seconds, for tests

The first run builds synthetic_misc/default (about 50-75 s on 2 cores), then trains 900 steps from the
model in misc_jax/assets/synthetic_kbcnet.msgpack and evaluates once, with three KBC passes: validation
PCK@0.1 (bbox) 62.97% (seed 1: 63.17%), 60.86% before the first step (docs/training.md, with the times
measured from fresh clones; the target was 60%). That model was trained on synthetic_misc/large (20,000
training pairs) by

  python -m misc_jax.main --config configs/synthetic.py:pretrain --workdir runs/pretrain  # 57 minutes
  python -m misc_jax.tools.export_trunk --workdir runs/pretrain --out trunk.msgpack
  python -m misc_jax.main --config configs/synthetic.py:pretrain_kbc --workdir runs/pretrain_kbc \
      --config.model.trunk_init=trunk.msgpack                                          # 28 minutes
  python -m misc_jax.main --config configs/synthetic.py:pretrain_kbc --workdir runs/pretrain_kbc2 \
      --config.model.init_from=runs/pretrain_kbc --config.seed=1                       # 28-45 minutes
  python -m misc_jax.main --config configs/synthetic.py:pretrain_kbc --workdir runs/pretrain_kbc3 \
      --config.model.init_from=runs/pretrain_kbc2 --config.seed=2                      # 22 minutes
  python -m misc_jax.tools.export_trunk --workdir runs/pretrain_kbc3 --out kbcnet.msgpack

`:pretrain` is the long recipe for 8,000 steps (validation PCK@0.1 19.1%, KBC off; its trunk is
synthetic_trunk.msgpack, where `:pretrain_kbc` starts); `:pretrain_kbc` the same losses with half the
pairs through KBC crops, 6,000 steps (52.4%, then 57.8%, then 60.9%, three KBC passes). `:scratch` is the
demo from random weights (4.6%); `:long` the long recipe on the 2,000 default pairs for 12,000 steps
(16.6% at its best step, 52% on training pairs: it overfits them).
"""

import os

from configs import common
import misc_jax

# Pretrained on synthetic_misc/large, with their provenance (misc_jax.tools.export_trunk): the trunk
# (backbone + CSFA) that `:pretrain` trained, and the whole KBCNet-tiny that three runs of `:pretrain_kbc`
# trained from that trunk, which the demo and the dual path (configs/misc210k_dualpath.py) start from.
ASSETS = os.path.join(os.path.dirname(misc_jax.__file__), 'assets')
PRETRAINED_TRUNK = os.path.join(ASSETS, 'synthetic_trunk.msgpack')
PRETRAINED_KBCNET = os.path.join(ASSETS, 'synthetic_kbcnet.msgpack')
KBCNET_MODULES = ('backbone', 'csfa', 'decoder', 'corr_head', 'refine_head')  # all of it (trunk_modules)


def get_config(arg: str | None = None):
  config = common.kbcnet_config('kbcnet_tiny', 'synthetic_misc/default', image_size=128)
  # 1,200 steps of 8 pairs learn more than 600 of 16 in the same time (5.58% vs 4.89% PCK@0.1).
  config.batch_size = 8
  config.total_steps = 1200
  config.log_every_steps = 50
  config.eval_every_steps = 600
  # A save every 600 steps (4 minutes here): the demo makes two, not four (each slowed its minute by 10-15 s).
  config.checkpoint_every_steps = 600
  config.input.max_instances = 4
  config.input.max_keypoints = 12
  config.input.shuffle_buffer = 512
  config.optim.lr = 2e-3
  config.optim.backbone_lr = 2e-3  # the heads' rate, for the shipped trunk too (5e-4: within noise)
  config.optim.warmup_steps = 100
  # Several target instances answer each source keypoint: the whole-image soft-argmax averages them into a
  # point between instances, a soft-argmax around the best score keeps one (4.13% vs 2.48% PCK@0.1). The
  # local one, not CHM's kernel: it ignores a shift of the scores, which collapsed CHM's to 0.44% in a long
  # run (docs/training.md).
  config.model.transfer = 'local_soft_argmax'
  config.model.sigma = 1.5

  if arg in (None, ''):  # the demo fine-tunes the shipped KBCNet-tiny, every module of it
    config.model.trunk_init = PRETRAINED_KBCNET
    config.model.trunk_modules = KBCNET_MODULES
    # Under a third of the rate from scratch: at 2e-3 the 900 steps undid part of the pretraining (PCK@0.1
    # 51.2 / 50.3% from 52.4% before the first step, the first :pretrain_kbc run's model; 2e-4 53.9 / 53.8%,
    # 6e-4 54.3 / 54.1%). From the shipped model (three runs): 62.97 / 63.17% from 60.86% (docs/training.md).
    config.optim.lr = config.optim.backbone_lr = 6e-4
    # KBC's second pass on crops around the keypoints: 16.2% vs 12.7% PCK@0.1 on the trunk's own run at
    # step 4,000 (docs/training.md). One evaluation, at the end: each crop pass costs one more forward pass.
    config.kbc.eval = True
    # Several target instances answer each keypoint, so the coarse pass scatters over them: the target crop
    # frames the predictions that agree, and half the training pairs are seen through such crops, the
    # target's around one instance. PCK@0.1 31.8 / 32.5% (seeds 0 / 1) against 21.4 / 20.8% with neither
    # (docs/kbc.md).
    config.kbc.coarse_radius = 0.5
    config.kbc.train_prob = 0.5
    # Three crop passes zooming in (1.36x, 1.84x, 2.5x), each re-centred on the last one's predictions: the
    # coarse pass places the crop off its instance often enough to cost 10 points (docs/kbc.md).
    config.kbc.passes = 3
    # 900 steps, not the 1,200 of :scratch: the README command (install and dataset build included) must
    # finish in 10 minutes on 2 cores, and with 1,200 it took up to 11.5. The cost: PCK@0.1 21.4 / 20.8%
    # against 22.6 / 21.7% (seeds 0 / 1, the KBC settings of the time; docs/training.md).
    config.total_steps = 900
    config.eval_every_steps = config.total_steps

  if arg in ('long', 'pretrain', 'pretrain_kbc'):  # the long run of docs/training.md: 12,000 steps, ~75 min
    config.total_steps = 12000
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.optim.warmup_steps = 300
    config.input.max_dense_points = 49  # the renderer's dense points besides the keypoints
    config.model.match_targets = 'bilinear'
    config.model.match_loss_weight = 1.0
    config.model.part_loss_weight = 1.0
    config.model.num_parts = 5 * (12 + 49)  # categories x point slots
  if arg in ('pretrain', 'pretrain_kbc'):  # the long recipe on 10x the training pairs (it overfits 2,000)
    config.dataset.name = 'synthetic_misc/large'
    config.total_steps = 8000
  if arg == 'pretrain_kbc':  # the next stage, from :pretrain's trunk: half the pairs through KBC crops
    config.model.trunk_init = PRETRAINED_TRUNK  # the shipped one; --config.model.init_from for a later run
    config.total_steps = 6000
    config.optim.lr = config.optim.backbone_lr = 1e-3
    config.kbc.train_prob = 0.5
    config.kbc.coarse_radius = 0.5
    config.kbc.eval = True

  if arg == 'smoke':
    config.dataset.name = 'synthetic_misc/tiny'
    config.batch_size = 8
    config.total_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    config.input.image_size = 64
    config.input.max_instances = 3
    config.input.shuffle_buffer = 8
    config.optim.warmup_steps = 2
  elif arg not in (None, '', 'scratch', 'long', 'pretrain', 'pretrain_kbc'):
    raise ValueError(f'unknown config argument {arg!r}; expected "smoke", "scratch", "long", "pretrain", '
                     '"pretrain_kbc" or nothing')
  return config
