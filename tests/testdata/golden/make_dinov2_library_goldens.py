r"""Writes dinov2_<case>_<library>.npz: DINOv2 outputs of `transformers` and timm on formula-defined weights.

  python -m venv /tmp/goldens && /tmp/goldens/bin/pip install torch transformers timm safetensors numpy
  /tmp/goldens/bin/python tests/testdata/golden/make_dinov2_library_goldens.py

Never needed by CI or the tests, which read the .npz files. The weights are shared/golden section 11's
formula (dinov2_<case>_state_dict_spec.json beside this file), written in each library's own layout (the
hub names of `transformers`' Dinov2Model / Dinov2WithRegistersModel; timm's names after its DINOv2
checkpoint filter: no mask token, and with registers `reg_token`, the class position folded into the class
token, `pos_embed` over the patches). Inputs: `np.random.default_rng(0).standard_normal((1, 3, h, w))` as
float32 (already normalised; the tests rebuild it), at 518 x 518 (the 37 x 37 grid: no resizing) and
392 x 518 (28 x 37: each library resizes the position embedding its own way). Saved, from the final
LayerNorm's output: `prefix_<h>x<w>` [1, 1 + R, D] (cls, registers), `patches_<h>x<w>` [1, 100, D] at
`patch_index_<h>x<w>` (100 patch tokens spread over the grid, row-major) and `patch_sum_<h>x<w>` [1, D]
(float64 sum over every patch token), so the files stay small.
"""

import os
import sys
import tempfile

import numpy as np
import safetensors.torch
import timm
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # tests/: the formula weights the tests use too
import golden_weights  # pylint: disable=g-import-not-at-top,wrong-import-position


def torch_arrays(state):
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
SIZES = ((518, 518), (392, 518))


def tokens_count(h, w):
  return (h // 14) * (w // 14)


def main():
  for case, registers in (('vits14', 0), ('vits14_reg', 4)):
    official = golden_weights.dinov2(case)
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                  image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True)
    if registers:
      config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
      model_class = transformers.Dinov2WithRegistersModel
    else:
      config, model_class = transformers.Dinov2Config(**common), transformers.Dinov2Model
    # Through a hub-layout snapshot, as users load one (transformers 5 renames the arrays in memory).
    with tempfile.TemporaryDirectory() as snapshot:
      config.save_pretrained(snapshot)
      safetensors.torch.save_file(torch_arrays(golden_weights.as_transformers(official)),
                                   os.path.join(snapshot, 'model.safetensors'))
      hf, info = model_class.from_pretrained(snapshot, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    name = 'vit_small_patch14_reg4_dinov2' if registers else 'vit_small_patch14_dinov2'
    tm = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    tm.load_state_dict(torch_arrays(golden_weights.as_timm(official)), strict=True)
    outputs = {'transformers': {}, 'timm': {}}
    for h, w in SIZES:
      image = torch.tensor(np.random.default_rng(0).standard_normal((1, 3, h, w)), dtype=torch.float32)
      with torch.no_grad():
        hf_tokens = hf.eval()(pixel_values=image).last_hidden_state
        timm_tokens = tm.eval().forward_features(image)
      first = 1 + registers
      keep = np.linspace(0, tokens_count(h, w) - 1, 100).round().astype(int)  # 100 patch tokens
      for library, tokens in (('transformers', hf_tokens), ('timm', timm_tokens)):
        tokens = tokens.numpy()
        outputs[library][f'prefix_{h}x{w}'] = tokens[:, :first]
        outputs[library][f'patches_{h}x{w}'] = tokens[:, first + keep]
        outputs[library][f'patch_index_{h}x{w}'] = keep
        outputs[library][f'patch_sum_{h}x{w}'] = tokens[:, first:].astype(np.float64).sum(1)
    for library, arrays in outputs.items():
      versions = {'transformers': transformers.__version__, 'timm': timm.__version__}[library]
      np.savez_compressed(os.path.join(HERE, f'dinov2_{case}_{library}.npz'), version=versions, **arrays)
      print(case, library, versions, {k: v.shape for k, v in arrays.items()})


if __name__ == '__main__':
  main()
