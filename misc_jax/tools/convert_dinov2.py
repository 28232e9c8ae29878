r"""Converts a DINOv2 checkpoint into a backbone for `config.model.backbone_init`.

  python -m misc_jax.tools.convert_dinov2 dinov2_vitb14_pretrain.pth ~/weights/vitb14.msgpack
  python -m misc_jax.tools.convert_dinov2 ~/hf/dinov2-base ~/weights/vitb14.msgpack  # a HF snapshot

IN is a checkpoint of any size, with or without registers, in one of three layouts, detected from its keys
and logged:
- official: the hub models' state_dict (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` from
  dl.fbaipublicfiles.com/dinov2);
- transformers: the `model.safetensors` of `facebook/dinov2-{small,base,large,giant}` and
  `facebook/dinov2-with-registers-*` (`embeddings.position_embeddings`, separate query/key/value,
  `layer_scale1.lambda1`, the giant's SwiGLU as `weights_in` / `weights_out`), or a snapshot directory
  holding it with its config.json;
- timm: `vit_{small,base,large,giant}_patch14[_reg4]_dinov2.lvd142m` (no mask token; with registers its
  class token carries the class position embedding and `pos_embed` covers the patches only).
`.pth` needs torch (the `torch` extra); `.safetensors` and `.npz` do not. The architecture (size, registers)
is read off the arrays and logged; a checkpoint that fits no layout, or does not fit the model, is refused
with the key and shapes named. OUT is a msgpack of {'params'} in misc_jax.models.dinov2 layout; configs name
the same model in `model.dinov2` ('vitb14', 'vitb14_reg').
"""

import re
from typing import Sequence

from absl import app
from absl import logging
from etils import epath
import numpy as np

from misc_jax.models import dinov2
from misc_jax.tools import convert_resnet

_TRANSFORMERS_BLOCK = {  # encoder.layer.N.<this> -> blocks.N.<that>
    'norm1': 'norm1', 'norm2': 'norm2', 'attention.output.dense': 'attn.proj',
    'layer_scale1.lambda1': 'ls1.gamma', 'layer_scale2.lambda1': 'ls2.gamma',
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2', 'mlp.weights_in': 'mlp.w12', 'mlp.weights_out': 'mlp.w3'}
_TRANSFORMERS_TOP = {
    'embeddings.cls_token': 'cls_token', 'embeddings.mask_token': 'mask_token',
    'embeddings.position_embeddings': 'pos_embed', 'embeddings.register_tokens': 'register_tokens',
    'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias'}


def layout(state: dict) -> str:
  """'official', 'transformers' or 'timm', from the keys; anything else is refused naming a key."""
  if 'embeddings.patch_embeddings.projection.weight' in state:
    return 'transformers'
  if 'patch_embed.proj.weight' in state and 'cls_token' in state:
    return 'official' if 'mask_token' in state else 'timm'  # timm drops the mask token
  raise ValueError(f'not a DINOv2 state_dict in the official, transformers or timm layout (no cls_token / '
                   f'patch_embed.proj.weight / embeddings.patch_embeddings.projection.weight among '
                   f'{len(state)} keys, e.g. {sorted(state)[:3]})')


def to_official(state: dict) -> tuple[str, dict]:
  """(the layout, the same arrays as an official DINOv2 state_dict)."""
  state = {k.removeprefix('dinov2.'): np.asarray(v) for k, v in state.items()}
  kind = layout(state)
  if kind == 'transformers':
    out, qkv = {}, {}
    for key, value in state.items():
      if key in _TRANSFORMERS_TOP:
        out[_TRANSFORMERS_TOP[key]] = value
        continue
      match = re.fullmatch(r'encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)', key)
      if not match:
        raise ValueError(f'transformers layout: the key {key!r} (shape {value.shape}) has no place in DINOv2')
      block, name, leaf = match.groups()
      if name.startswith('attention.attention.'):  # query, key, value -> one qkv, in that order
        qkv.setdefault((block, leaf), {})[name.rsplit('.', 1)[1]] = value
        continue
      full = f'{name}.{leaf}' if leaf == 'lambda1' else name
      if full not in _TRANSFORMERS_BLOCK:
        raise ValueError(f'transformers layout: the key {key!r} (shape {value.shape}) has no place in DINOv2')
      target = _TRANSFORMERS_BLOCK[full]
      out[f'blocks.{block}.{target}' + ('' if leaf == 'lambda1' else f'.{leaf}')] = value
    for (block, leaf), parts in qkv.items():
      if sorted(parts) != ['key', 'query', 'value']:
        raise ValueError(f'transformers layout: block {block} has the attention {leaf} of '
                         f'{sorted(parts)}, expected query, key and value')
      out[f'blocks.{block}.attn.qkv.{leaf}'] = np.concatenate([parts[n] for n in ('query', 'key', 'value')])
    state = out
  elif kind == 'timm':
    state = dict(state)
    if 'reg_token' in state:  # timm folded the class position into the class token (no_embed_class)
      state['register_tokens'] = state.pop('reg_token')
      pos = state['pos_embed']
      state['pos_embed'] = np.concatenate([np.zeros_like(pos[:, :1]), pos], 1)
    fc1 = state.get('blocks.0.mlp.fc1.weight')
    if fc1 is not None and fc1.shape[0] != 4 * state['cls_token'].shape[-1]:
      # the giant's packed SwiGLU: timm's fc1 / fc2 are the official w12 / w3
      state = {re.sub(r'mlp\.fc1\.', 'mlp.w12.', re.sub(r'mlp\.fc2\.', 'mlp.w3.', k)): v
               for k, v in state.items()}
  if 'mask_token' not in state:  # used only by DINOv2's own training; timm drops it
    state['mask_token'] = np.zeros((1, state['cls_token'].shape[-1]), np.float32)
  return kind, state


def model_name(state: dict) -> str:
  """The hub model an official state_dict belongs to ('vitb14', 'vitg14_reg', ...), from its shapes."""
  dim = state['cls_token'].shape[-1]
  sizes = {arch[0]: name for name, arch in dinov2.SIZES.items()}
  if dim not in sizes:
    raise ValueError(f'cls_token has width {dim}; the DINOv2 widths are {sorted(sizes)}')
  return sizes[dim] + ('_reg' if 'register_tokens' in state else '')


def read(path: str) -> dict:
  """A checkpoint file, or a Hugging Face snapshot directory (config.json + model.safetensors)."""
  p = epath.Path(path)
  if p.is_dir():
    weights = p / 'model.safetensors'
    if not (p / 'config.json').exists() or not weights.exists():
      raise ValueError(f'{path}: a directory must be a Hugging Face snapshot holding config.json and '
                       'model.safetensors')
    path = str(weights)
  return convert_resnet.load_state_dict(path)


def convert(in_path: str, out_path: str) -> dict:
  """Reads IN, writes OUT, returns the converted {'params'}."""
  try:
    kind, state = to_official(read(in_path))
    name = model_name(state)
    variables = dinov2.official_to_flax(state, name)
  except ValueError as e:
    raise ValueError(f'{in_path}: {e}') from None
  num = convert_resnet.write(variables, out_path)
  logging.info('Wrote %s: DINOv2 %s from the %s layout, %d parameters (config: --config.model.dinov2=%s).',
               out_path, name, kind, num, name)
  return variables


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError('usage: python -m misc_jax.tools.convert_dinov2 IN OUT')
  convert(argv[1], argv[2])


if __name__ == '__main__':
  app.run(main)
