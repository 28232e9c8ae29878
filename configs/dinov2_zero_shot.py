r"""Zero-shot keypoint transfer with DINOv2 tokens: their cosine similarity and the soft-argmax, no training.

  python -m misc_jax.tools.convert_dinov2 dinov2_vitb14_pretrain.pth ~/weights/vitb14.msgpack
  python -m misc_jax.main --config configs/dinov2_zero_shot.py:spair71k --workdir runs/zero_shot_spair \
      --config.model.backbone_init=~/weights/vitb14.msgpack [--config.dataset.eval_split=test]

The argument is the dataset (spair71k, pf_pascal, pf_willow, synthetic_misc, misc210k); the run evaluates
the converted checkpoint on `dataset.eval_split` (validation by default; any split, or a slice such as
'test[:500]'), writes the report and figures like any run, and saves the model as step 0, so that
misc-jax-evaluate (other splits, KBC) and misc-jax-predict work on the workdir too. `--config.model.dinov2`
names another model (vits14, vitl14, vitg14, vitb14_reg, ...), `--config.model.dinov2_blocks` the blocks
whose tokens are compared (their mean cosine; default the last block).
"""

from configs import common

DATASETS = {'spair71k': ('spair71k', 'bbox'), 'pf_pascal': ('pf_pascal/chm', 'image'),
            'pf_willow': ('pf_willow', 'bbox'), 'synthetic_misc': ('synthetic_misc/default', 'bbox'),
            'misc210k': ('misc210k', 'bbox')}


def get_config(arg: str | None = None):
  if arg not in DATASETS:
    raise ValueError(f'unknown config argument {arg!r}; expected one of {sorted(DATASETS)}')
  dataset, threshold = DATASETS[arg]
  config = common.use_dinov2(common.kbcnet_config('kbcnet_r101', dataset, image_size=518), 'vitb14', (11,))
  config.model.name = 'token_matching'
  config.total_steps = 0  # evaluation only
  config.dataset.eval_split = 'test' if arg == 'pf_willow' else 'validation'
  config.input.max_instances = 8 if arg in ('misc210k', 'synthetic_misc') else 1
  config.input.max_keypoints = {'spair71k': 30, 'pf_pascal': 20, 'pf_willow': 10, 'synthetic_misc': 12,
                                'misc210k': 52}[arg]
  config.eval.threshold = threshold
  config.eval.extra_thresholds = ('chm',) if arg == 'pf_willow' else ()
  return config
