r"""KBCNet-R101 on SPair-71k (bbox PCK), from an ImageNet ResNet-101 converted from torchvision.

  python -m tfds_builders.build spair71k --manual_dir ~/data/SPair-71k  # once
  python -m misc_jax.tools.convert_resnet resnet101-63fe2227.pth ~/weights/resnet101.msgpack
  python -m misc_jax.main --config configs/kbcnet_spair.py --workdir gs://BUCKET/kbcnet_spair \
      --config.model.backbone_init=~/weights/resnet101.msgpack
  python -m misc_jax.tools.sweep_kbc --workdir gs://BUCKET/kbcnet_spair --split validation \
      --max_scale 1.5,2,2.5,3 --fill 0.65,0.8 --small_threshold 0.3,0.5   # tune KBC, then:
  misc-jax-evaluate --workdir gs://BUCKET/kbcnet_spair --checkpoint best --split test --kbc \
      --set kbc.max_scale=... --set kbc.fill=... --set kbc.small_threshold=...

`--config configs/kbcnet_spair.py:hires`: the same at 1024 px with each pair split over 8 chips;
`:stride8`: the same at 512 px with a 64 x 64 grid (stride 8) instead of 32 x 32.

What it should reach: the peers' SPair-71k test PCK@0.1 (bbox) is 46.3 (CHM), 49.9 (CATs), ~60 (CATs++);
KBCNet reports +7.5 from KBC at test time. Not yet measured here: the dataset cannot be downloaded on our
machines. The recipe, field by field next to the peers', is in docs/reproduction.md.
"""

from configs import common


def get_config(arg: str | None = None):
  config = common.kbcnet_config('kbcnet_r101', 'spair71k', image_size=512)
  # CATs' schedule: 100 epochs of the 53,340 training pairs at a global batch of 32 (166,688 steps); a
  # pod with another batch keeps the epochs, and the learning rates follow the square-root rule (optim.py).
  config.batch_size = 32
  config.num_epochs = 100
  config.eval_every_steps = 1667  # about one epoch at batch 32
  config.checkpoint_every_steps = 1667
  config.optim.warmup_epochs = 1
  # CHM's learning rates (its 4D-convolution head is the closest to ours): 1e-3 head, 1e-5 backbone.
  # CATs fine-tunes at 3e-5 / 3e-6 with AdamW's decay 0.05; CHM uses Adam without decay. Ours: a light
  # decay of 1e-4 on kernels only (optim.decay_mask), which over this schedule shrinks an unused kernel by
  # 1% (CATs' 0.05 at CHM's rates would shrink it to 1.5%); the sweep in docs/reproduction.md tries 0-1e-3.
  config.optim.lr = 1e-3
  config.optim.backbone_lr = 1e-5
  config.optim.reference_batch_size = 32
  config.optim.weight_decay = 1e-4
  # CATs' augmentation: the crop that keeps the object's box (p 0.5) and its colour list (p 0.2 each).
  config.input.augment.photometric = False
  config.input.augment.box_crop = 0.5
  config.input.augment.cats_colour = 0.2
  config.model.feature_stride = 16  # a 32 x 32 grid at 512 px
  # The whole 4D volume at once: 6.3x faster than chunks of 4 rows on an H100, and a step of 8 pairs at
  # 512 px with a 64 x 64 grid needed 23 GiB (docs/performance.md); chunks bound memory on small devices.
  config.model.decoder_chunk_rows = 0
  config.model.dtype = 'bfloat16'
  config.model.freeze_stages = 2
  config.eval.threshold = 'bbox'
  # KBC at test time, as in the paper's headline number. Its settings are not published: the values here
  # were chosen on the synthetic data's validation split and must be tuned on SPair-71k's validation split
  # (misc_jax.tools.sweep_kbc, above) before the test split is evaluated.
  config.kbc.eval = True
  # Our choice, not the paper's (its text does not say whether it crops in training): half the training
  # pairs are seen through KBC crops, the target's around one instance. On the synthetic demo these crops
  # are what teach the second pass (+4.5 to +10 points, docs/kbc.md). The target crop at test time frames
  # the coarse predictions within 0.5 x the source box's side of their median, so one outlier does not
  # stretch it (+1.5 to +3.8 points there).
  config.kbc.train_prob = 0.5
  config.kbc.coarse_radius = 0.5
  if arg == 'stride8':
    # A 64 x 64 grid at 512 px (stride 8): source keypoints 8 px apart no longer share a cell; the volume
    # is 16x larger (a step of 8 pairs needed 23 GiB on an H100, docs/performance.md). Not yet measured
    # against stride 16 on accuracy: docs/reproduction.md says what to run.
    config.model.feature_stride = 8
  elif arg == 'hires':
    # 1024 px (a 64 x 64 grid: 16.8M volume cells per pair and scale), each pair's volume split by rows
    # over 8 chips (mesh.spatial; per-chip memory in docs/launch.md); the global batch divides over the
    # devices / 8 data-parallel groups.
    config.input.image_size = 1024
    config.mesh.spatial = 8
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}')
  return config
