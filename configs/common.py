"""The fields every KBCNet experiment sets; each configs/<experiment>.py starts from `kbcnet_config`."""

import ml_collections

from misc_jax.models import kbcnet

placeholder = ml_collections.config_dict.placeholder


def kbcnet_config(variant: str, dataset: str, image_size: int) -> ml_collections.ConfigDict:
  """A complete config: data, KBCNet `variant`, optimiser, schedule, evaluation, checkpoints."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 8  # global, across all processes and devices: a multiple of the device count
  config.num_epochs = placeholder(float)  # the schedule's length (steps follow from the batch), or:
  config.total_steps = placeholder(int)   # when set, the number of steps (num_epochs is then ignored)
  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.resume_step = placeholder(int)  # resume from this checkpoint step; the newer ones are moved aside
  config.steps_per_dispatch = 1  # k > 1: k steps per call (train.train_steps); the counts above divide by k
  config.unroll_dispatch = False  # True: those k steps unrolled (k x the compile time; faster on CPUs)

  # The device mesh (misc_jax/sharding.py; docs/launch.md). Every device on `batch` is data parallelism
  # over every chip (what jax.pmap compiles to); `fsdp` chips also split the train state. -1: the rest.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.batch = -1
  config.mesh.fsdp = 1
  config.mesh.spatial = 1  # chips splitting each pair's 4D volume by rows (docs/launch.md)
  config.mesh.dcn_batch = 1  # multi-slice TPU pods: slices along `batch` over the data-centre network
  config.mesh.fsdp_min_size = 2 ** 16  # state arrays smaller than this (elements) stay replicated

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = dataset
  config.dataset.data_dir = placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'

  config.input = ml_collections.ConfigDict()
  config.input.image_size = image_size
  config.input.keep_aspect = False  # False: stretch to a square, as the peers do for PCK
  config.input.max_instances = 1
  config.input.max_keypoints = 30
  config.input.max_dense_points = 0  # > 0: train on the dataset's dense points too (synthetic_misc: 49)
  config.input.shuffle_buffer = 1024
  config.input.prefetch = 2
  config.input.decoding_threads = placeholder(int)  # None: every core the process may use
  config.input.data_shards = placeholder(int)  # None: one per process (see input_pipeline.py)
  config.input.augment = ml_collections.ConfigDict()
  config.input.augment.photometric = True
  config.input.augment.brightness = 0.1  # max delta, images in [0, 1]
  config.input.augment.contrast = 0.2    # factor range 1 +- this
  config.input.augment.saturation = 0.2
  config.input.augment.box_crop = 0.0     # probability of CATs' crop that keeps the objects' box
  config.input.augment.cats_colour = 0.0  # probability of each of CATs' 7 colour augmentations

  config.model = ml_collections.ConfigDict(dict(name='kbcnet', variant=variant, backbone='resnet',
                                                **kbcnet.decode_variant(variant)))
  config.model.decoder_groups = 4
  # HSNet strides the dims of the image it does not predict on and keeps the other at full resolution:
  # here the source dims are strided and the target, where keypoints land, is not ('target': the reverse).
  config.model.decoder_stride_dims = 'source'
  # Backbone blocks whose features are correlated (models/resnet.py): 'last' (the last block of layers
  # 2-4), 'cats' (CATs' 8 ResNet-101 blocks), 'hsnet' (every block of layers 2-4), or DHPF indices ('1,2,3').
  config.model.hyperpixels = 'last'
  config.model.feature_stride = 8     # feature grid = image_size / feature_stride per side
  config.model.decoder_chunk_rows = 0  # > 0: decoder in chunks of rows (of the image it does not stride)
  config.model.dtype = 'float32'      # 'bfloat16': bf16 compute, float32 params, scores and loss
  # True: ViT and decoder blocks are recomputed in the backward pass instead of keeping their activations
  # (less memory for one more forward pass; the gradients do not change).
  config.model.remat = False
  # or 'kernel_soft_argmax' (CHM's) or 'local_soft_argmax' (around the best score), per source cell; or per
  # keypoint 'argmax' / 'windowed_soft_argmax' (the DINOv2 line's); the loss keeps the soft_argmax
  config.model.transfer = 'soft_argmax'
  config.model.window = 2.0           # windowed_soft_argmax: the cells within this of the best one
  config.model.beta = 0.02            # softmax temperature of the transfer
  config.model.sigma = 5.0            # Gaussian of the kernel and local soft-argmax, in feature cells
  config.model.match_loss_weight = 0.1  # cross-entropy on the true target cells (kbcnet.train_loss)
  config.model.match_targets = 'nearest'  # those cells: 'nearest', or 'bilinear' (sub-cell targets)
  config.model.transfer_loss_weight = 1.0  # the soft-argmax prediction's distance to the truth
  config.model.part_loss_weight = 0.0  # > 0: cells also classify the part they show (models/supervision.py)
  config.model.num_parts = 0  # its classes: categories x (max_keypoints + max_dense_points)
  # Sub-cell refinement (kbcnet.refine_keypoints), on the backbone's first (finest) feature map: 0 is off.
  config.model.refine_dim = 0
  config.model.refine_radius = 3     # the window: a Gaussian of sigma r cells of that map around the coarse match
  config.model.refine_beta = 0.05    # softmax temperature over the window's cosines
  config.model.refine_loss_weight = 1.0
  config.model.freeze_stages = 0      # 0: train all; 1: freeze the stem; 2: stem and layer1; ...
  config.model.freeze_backbone = False  # True: the whole backbone (no backward pass through it)
  config.model.fold_batchnorm = True  # frozen BatchNorm folded into the convolutions (models/resnet.py)
  config.model.backbone_init = placeholder(str)  # msgpack from misc_jax.tools.convert_resnet
  config.model.backbone_from_scratch = False     # True: allow a BatchNorm backbone without weights
  config.model.trunk_init = placeholder(str)     # a run's modules from misc_jax.tools.export_trunk...
  config.model.trunk_modules = ('backbone', 'csfa')  # ...of which the model takes these (the trunk)
  config.model.init_from = placeholder(str)      # another run's workdir: start from its params
  config.model.init_from_checkpoint = 'latest'   # of that run: 'latest', 'best' or a step number

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3
  config.optim.backbone_lr = 1e-4
  config.optim.weight_decay = 1e-4
  config.optim.warmup_steps = 200
  config.optim.warmup_epochs = placeholder(float)  # when set, replaces warmup_steps
  config.optim.reference_batch_size = placeholder(int)  # the global batch lr and backbone_lr are tuned at
  config.optim.lr_scaling = 'sqrt'  # how they follow other batches (optim.py): 'sqrt', 'linear', 'none'
  config.optim.final_lr_fraction = 0.01
  config.optim.grad_clip = 1.0

  config.eval = ml_collections.ConfigDict()
  config.eval.evaluator = 'pck'  # misc_jax/evaluators/<name>.py: 'pck', or 'misc' (multi-instance)
  config.eval.alphas = (0.05, 0.1, 0.15)
  config.eval.threshold = 'bbox'  # 'bbox' (SPair-71k, PF-WILLOW) or 'image' (PF-PASCAL)
  config.eval.extra_thresholds = ()  # more PCK columns, e.g. ('chm',): CHM's PF-WILLOW rule (ops/pck.py)
  config.eval.best_metric = 'pck@0.1'
  config.eval.plot_alpha = 0.1

  # KBC, keypoint bounding-box-centred cropping (misc_jax/kbc.py).
  config.kbc = ml_collections.ConfigDict()
  config.kbc.eval = False          # evaluate with a second pass on crops around the keypoints
  config.kbc.coarse_pass = True    # place the target crop by the first pass's predictions (else: no crop)
  # Frame the target crop by the coarse predictions within this x the source keypoints' box side of their
  # median (kbc.agreeing; 0: by all of them). For several target instances: docs/kbc.md.
  config.kbc.coarse_radius = 0.0
  config.kbc.passes = 1            # crop passes after the coarse one, zooming in to max_scale (kbc.predict)
  config.kbc.train_prob = 0.0      # fraction of training pairs seen through KBC crops (ground-truth boxes)
  config.kbc.margin = 0.1          # added to every side of the keypoint box, x its longer side
  config.kbc.fill = 0.8            # the enlarged box (with margin) fills this fraction of the input
  config.kbc.max_scale = 2.5       # at most this enlargement (best of 2-6 on small_objects validation)
  config.kbc.small_threshold = 0.5  # crop only boxes whose longer side is below this x the input side
  return config


def use_dinov2(config: ml_collections.ConfigDict, name: str, blocks) -> ml_collections.ConfigDict:
  """A KBCNet (or dual-path) config on a DINOv2 backbone (misc_jax/models/dinov2.py): `name` is the
  official model ('vitb14', 'vitb14_reg', ...), `blocks` the blocks whose patch tokens CSFA aligns and
  correlates. The backbone is frozen (the DINOv2-based peers' recipe); --config.model.freeze_backbone=False
  fine-tunes it at optim.backbone_lr. Image sides must be multiples of 14 (518 px: a 37 x 37 grid)."""
  m = config.model
  for resnet_field in ('stage_sizes', 'width', 'backbone_norm', 'hyperpixels', 'freeze_stages'):
    del m[resnet_field]
  m.variant = f'kbcnet_dinov2_{name}'
  m.backbone = 'dinov2'
  m.dinov2 = name
  m.dinov2_blocks = tuple(blocks)
  m.feature_stride = 14
  m.freeze_backbone = True
  # True: the ViT blocks are one nn.scan layer (one block compiled instead of `depth`; params stacked, so a
  # checkpoint keeps the layout it was saved in, while converted weights load into either).
  m.scan_blocks = False
  return config
