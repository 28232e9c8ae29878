r"""The MISC dual-path model (co-segmentation + multi-instance correspondence) on MISC210K.

  python -m tfds_builders.build misc210k --manual_dir ~/data/MISC210K  # once (see docs/datasets.md)
  python -m misc_jax.main --config configs/misc210k_dualpath.py --workdir gs://BUCKET/misc210k_dualpath \
      --config.model.backbone_init=~/weights/resnet101.msgpack
  python -m misc_jax.main --config configs/misc210k_dualpath.py:synthetic --workdir runs/dualpath  # 14 min

`:synthetic` trains the tiny variant on synthetic_misc/default on a CPU, its trunk and correspondence path
from the shipped pretrained KBCNet-tiny (misc_jax/assets/synthetic_kbcnet.msgpack; results in docs/misc.md);
`:smoke` is the test variant; `:dinov2` puts the model on frozen DINOv2 ViT-B/14 tokens at 392 px (a 28 x 28
grid; --config.model.backbone_init=~/weights/vitb14.msgpack from misc_jax.tools.convert_dinov2).
Ablations: --config.model.coseg=False (no co-segmentation path: KBCNet),
--config.model.mask_volume=True (masks gate the 4D volume), --config.model.corr_to_mask=False
(correspondence evidence does not feed the masks), --config.model.transfer_on=true (the training transfer
restricted to the true instead of the predicted masks), --config.model.objectness_cost=1.0 (objectness in
the matching cost), --config.model.no_object_weight=1.0 (the unmatched queries' objectness weighs as
much as the matched ones'), --config.model.mask_stride=0 (masks on the feature grid),
--config.model.mask_iou_loss_weight=1.0 (a MaskIoU head ranks the detections),
--config.model.query_self_attention=True (the queries see each other), --config.eval.matrix_nms_sigma=0
(AP ranks the detections without Matrix NMS). Not yet measured on MISC210K: no copy here.
"""

from configs import common
from configs import synthetic


def _dual_path(config):
  """A KBCNet config -> the dual-path model on the same trunk, with the multi-instance evaluator."""
  config.model.name = 'dual_path'
  del config.model['decoder_chunk_rows']  # the dual path decodes the whole volume
  config.model.num_queries = 12      # instance queries per image; >= config.input.max_instances
  config.model.mask_dim = 64
  config.model.coseg = True          # the co-segmentation path
  config.model.corr_to_mask = True   # correspondence evidence feeds the mask path
  # Predicted foreground gating the 4D correlation: off (on, it halved the correspondence's PCK on the
  # synthetic data: docs/misc.md).
  config.model.mask_volume = False
  config.model.positional_encoding = True  # cell positions join the mask features
  # Masks on a stride-4 grid (Mask2Former's resolution): the upsampled cell features plus a convolutional
  # stem on the image (dual_path.PixelStem). 0 draws them on the feature grid (mIoU 44-46% against 49-51%
  # on the synthetic data, docs/misc.md).
  config.model.mask_stride = 4
  config.model.transfer_on = 'predicted'   # the region the training transfer is restricted to, or 'true'
  config.model.mask_loss_weight = 1.0
  # > 0: a MaskIoU head (Mask Scoring R-CNN) learns each mask's IoU with the instance matched to it, behind
  # a stop-gradient, and AP ranks by objectness x that IoU; 0: by objectness x the mean mask probability.
  # Off: the same AP on the synthetic data (docs/misc.md).
  config.model.mask_iou_loss_weight = 0.0
  # The queries attend to each other too (DETR's decoder), against duplicate masks. Off: no gain measured.
  config.model.query_self_attention = False
  config.model.objectness_cost = 0.0  # objectness's weight in the Hungarian matching cost (masks: BCE + Dice)
  # The objectness loss's weight on the queries matched to nothing (DETR's and Mask2Former's eos_coef):
  # at 1 the objectness was under-confident and mIoU 28-30%; at 0.1 mIoU 44-46% (docs/misc.md).
  config.model.no_object_weight = 0.1
  config.eval.evaluator = 'misc'
  config.kbc.eval = False  # the multi-instance evaluator has no KBC pass
  config.kbc.train_prob = 0.0  # nor do its losses crop: the masks are of every instance in the whole image
  config.eval.objectness_threshold = 0.5
  # AP's ranking: each detection's score decays by its mask's overlap with better-ranked masks (SOLOv2's
  # Matrix NMS at its paper's sigma 2; 0: off). +0.3 to +0.8 AP@0.5 on six synthetic trainings (docs/misc.md).
  config.eval.matrix_nms_sigma = 2.0
  config.eval.threshold = 'bbox'      # the target instance's box
  return config


def get_config(arg: str | None = None):
  if arg in ('synthetic', 'smoke'):  # KBCNet-tiny's synthetic settings (configs/synthetic.py)
    # From the synthetic base, not the KBCNet demo (its KBC crops and fine-tuning rate); its model below.
    config = _dual_path(synthetic.get_config('smoke' if arg == 'smoke' else 'scratch'))
    config.model.num_queries = 6
    if arg == 'synthetic':  # 3,000 steps: 12-14 minutes alone on 2 CPU cores
      config.total_steps = 3000
      # The demo's pretrained KBCNet-tiny: the correspondence path whole, the mask path fresh. PCK@0.1 22.0 /
      # 21.5% against 19.1 / 18.1% from :pretrain's trunk alone, mIoU and AP the same (docs/misc.md).
      config.model.trunk_init = synthetic.PRETRAINED_KBCNET
      config.model.trunk_modules = synthetic.KBCNET_MODULES
      config.eval_every_steps = 750  # the KBCNet demo evaluates once, for KBC's cost
    config.model.mask_dim = 32
    return config
  if arg not in (None, 'dinov2'):
    raise ValueError(f'unknown config argument {arg!r}; expected "synthetic", "smoke", "dinov2" or nothing')
  config = _dual_path(common.kbcnet_config('kbcnet_r101', 'misc210k', image_size=384))
  config.model.feature_stride = 16   # a 24 x 24 grid at 384 px
  config.model.freeze_stages = 2
  config.batch_size = 16
  config.total_steps = 40_000
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 1000
  # Checkpoints are chosen on the validation split held out from the training images (the builder), never
  # on test; evaluate test once at the end: misc-jax-evaluate --checkpoint best --split test.
  config.dataset.eval_split = 'validation'
  config.input.max_instances = 8
  config.input.max_keypoints = 52
  if arg == 'dinov2':
    config = common.use_dinov2(config, 'vitb14', (5, 8, 11))
    config.input.image_size = 392
    config.model.dtype = 'bfloat16'
  return config
