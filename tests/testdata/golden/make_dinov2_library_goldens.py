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

import json
import os
import tempfile

import numpy as np
import safetensors.torch
import timm
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = ((518, 518), (392, 518))


def formula(case):
  with open(os.path.join(HERE, f'dinov2_{case}_state_dict_spec.json')) as f:
    spec = json.load(f)['state_dict']
  out = {}
  for i, (key, shape) in enumerate(spec):
    base = np.sin(0.7 * np.arange(int(np.prod(shape))) + 1.3 * i).reshape(shape)
    if key in ('cls_token', 'mask_token', 'register_tokens', 'pos_embed'):
      value = 0.5 * base
    elif key.endswith('.gamma'):
      value = 0.5 * (1 + 0.1 * base)
    elif len(shape) > 1:
      value = base / np.sqrt(np.prod(shape[1:]))
    elif key.endswith('.weight'):
      value = 1 + 0.1 * base
    else:
      value = 0.05 * base
    out[key] = torch.tensor(value, dtype=torch.float32)
  return out


def as_transformers(official):
  top = {'cls_token': 'embeddings.cls_token', 'mask_token': 'embeddings.mask_token',
         'pos_embed': 'embeddings.position_embeddings', 'register_tokens': 'embeddings.register_tokens',
         'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
         'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
         'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
  part = {'norm1': 'norm1', 'norm2': 'norm2', 'attn.proj': 'attention.output.dense', 'mlp.fc1': 'mlp.fc1',
          'mlp.fc2': 'mlp.fc2', 'ls1.gamma': 'layer_scale1.lambda1', 'ls2.gamma': 'layer_scale2.lambda1'}
  out = {}
  for key, value in official.items():
    if key in top:
      out[top[key]] = value
      continue
    _, block, rest = key.split('.', 2)
    prefix = f'encoder.layer.{block}.'
    if rest.startswith('attn.qkv.'):
      for name, third in zip(('query', 'key', 'value'), value.chunk(3)):
        out[f'{prefix}attention.attention.{name}.{rest.rsplit(".", 1)[1]}'] = third
    elif rest in part:
      out[prefix + part[rest]] = value
    else:
      module, leaf = rest.rsplit('.', 1)
      out[f'{prefix}{part[module]}.{leaf}'] = value
  return out


def as_timm(official):
  out = {k: v for k, v in official.items() if k != 'mask_token'}
  if 'register_tokens' in out:
    out['reg_token'] = out.pop('register_tokens')
    out['cls_token'] = out['cls_token'] + out['pos_embed'][:, :1]
    out['pos_embed'] = out['pos_embed'][:, 1:]
  return out


def tokens_count(h, w):
  return (h // 14) * (w // 14)


def main():
  for case, registers in (('vits14', 0), ('vits14_reg', 4)):
    official = formula(case)
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
      safetensors.torch.save_file(as_transformers(official), os.path.join(snapshot, 'model.safetensors'))
      hf, info = model_class.from_pretrained(snapshot, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    name = 'vit_small_patch14_reg4_dinov2' if registers else 'vit_small_patch14_dinov2'
    tm = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    tm.load_state_dict(as_timm(official), strict=True)
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
