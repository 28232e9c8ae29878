r"""Zero-shot keypoint transfer with DINOv2 tokens: their cosine similarity, no training.

  python -m misc_jax.tools.convert_dinov2 dinov2_vitb14_pretrain.pth ~/weights/vitb14.msgpack
  python -m misc_jax.main --config configs/dinov2_zero_shot.py:spair71k --workdir runs/zero_shot_spair \
      --config.model.backbone_init=~/weights/vitb14.msgpack

The argument is the dataset (spair71k, pf_pascal, pf_willow, synthetic_misc, misc210k), optionally with a
variant after a comma (`spair71k,windowed`). By default the protocol of the DINOv2 correspondence line
(SD-DINO, GeoAware-SC): 840 px inputs (a 60 x 60 grid of patch tokens), the aspect ratio kept (the longer
side scaled to 840, the rest padded), each source keypoint's score row (interpolated from the patch
tokens) matched to its best target token (argmax), on the test split. Variants:
- `windowed`: the protocol with GeoAware-SC's windowed soft-argmax (the softmax of the keypoint's row
  within `model.window` tokens of its best one) instead of the argmax;
- `ours`: our earlier baseline, kept for comparison with it: 518 px stretched to a square, the soft-argmax
  over the whole target at beta 0.02 (it averages left/right symmetric modes into a point between them),
  on the validation split.

The run evaluates the converted checkpoint on `dataset.eval_split` (any split, or a slice such as
'test[:500]'), writes the report and figures like any run, and saves the model as step 0, so that
misc-jax-evaluate (other splits, KBC) and misc-jax-predict work on the workdir too. `--config.model.dinov2`
names another model (vits14, vitl14, vitg14, vitb14_reg, ...), `--config.model.dinov2_blocks` the blocks
whose tokens are compared (their mean cosine; default the last block).
"""

from configs import common

DATASETS = {'spair71k': ('spair71k', 'bbox'), 'pf_pascal': ('pf_pascal/chm', 'image'),
            'pf_willow': ('pf_willow', 'bbox'), 'synthetic_misc': ('synthetic_misc/default', 'bbox'),
            'misc210k': ('misc210k', 'bbox')}
VARIANTS = ('protocol', 'windowed', 'ours')


def get_config(arg: str | None = None):
  name, _, variant = (arg or '').partition(',')
  variant = variant or 'protocol'
  if name not in DATASETS or variant not in VARIANTS:
    raise ValueError(f'unknown config argument {arg!r}; expected DATASET[,VARIANT] with DATASET one of '
                     f'{sorted(DATASETS)} and VARIANT one of {VARIANTS}')
  dataset, threshold = DATASETS[name]
  ours = variant == 'ours'
  size = 518 if ours else 840
  config = common.use_dinov2(common.kbcnet_config('kbcnet_r101', dataset, image_size=size), 'vitb14', (11,))
  config.model.name = 'token_matching'
  config.model.transfer = {'protocol': 'argmax', 'windowed': 'windowed_soft_argmax',
                           'ours': 'soft_argmax'}[variant]
  config.input.keep_aspect = not ours
  config.total_steps = 0  # evaluation only
  config.dataset.eval_split = 'validation' if ours and name != 'pf_willow' else 'test'
  config.input.max_instances = 8 if name in ('misc210k', 'synthetic_misc') else 1
  config.input.max_keypoints = {'spair71k': 30, 'pf_pascal': 20, 'pf_willow': 10, 'synthetic_misc': 12,
                                'misc210k': 52}[name]
  config.eval.threshold = threshold
  config.eval.extra_thresholds = ('chm',) if name == 'pf_willow' else ()
  return config
