"""The formula-defined weights of shared/golden (sections 10 and 11), and DINOv2's written in the layouts of
`transformers` and timm: numpy only, so that the tests and the golden-generating scripts beside the .npz
files (tests/testdata/golden/make_*.py, run with torch in a throwaway virtualenv) build the same arrays."""

import json
import os

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'testdata', 'golden')


def _spec(name):
  with open(os.path.join(GOLDEN, name)) as f:
    return json.load(f)


def resnet101() -> dict:
  """torchvision's ResNet-101 state_dict of section 10."""
  out = {}
  for i, (key, shape) in enumerate(_spec('torchvision_resnet101_state_dict_spec.json')):
    n = int(np.prod(shape)) if shape else 1
    base = np.sin(0.7 * np.arange(n) + 1.3 * i).reshape(shape)
    if key.endswith('num_batches_tracked'):
      value = np.zeros(shape, np.int64)
    elif len(shape) > 1:
      value = base / np.sqrt(np.prod(shape[1:]))
    elif key.endswith('running_var'):
      value = 1 + 0.5 * base**2
    elif key.endswith('running_mean'):
      value = 0.1 * base
    elif key.endswith('bn3.weight'):
      value = 0.2 * (1 + 0.1 * base)
    elif key.endswith('.weight'):
      value = 1 + 0.1 * base
    else:
      value = 0.1 * base
    out[key] = value.astype(np.float32) if value.dtype == np.float64 else value
  return out


def dinov2(case: str) -> dict:
  """The official DINOv2 state_dict of section 11 ('vits14' or 'vits14_reg')."""
  out = {}
  for i, (key, shape) in enumerate(_spec(f'dinov2_{case}_state_dict_spec.json')['state_dict']):
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
    out[key] = value.astype(np.float32)
  return out


def as_transformers(official: dict) -> dict:
  """An official DINOv2 state_dict under the names of the `transformers` hub files (Dinov2Model)."""
  names = {'cls_token': 'embeddings.cls_token', 'mask_token': 'embeddings.mask_token',
           'pos_embed': 'embeddings.position_embeddings', 'register_tokens': 'embeddings.register_tokens',
           'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
           'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
           'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
  parts = {'norm1': 'norm1', 'norm2': 'norm2', 'attn.proj': 'attention.output.dense', 'mlp.fc1': 'mlp.fc1',
           'mlp.fc2': 'mlp.fc2', 'ls1.gamma': 'layer_scale1.lambda1', 'ls2.gamma': 'layer_scale2.lambda1'}
  out = {}
  for key, value in official.items():
    if key in names:
      out[names[key]] = value
      continue
    _, block, rest = key.split('.', 2)
    prefix = f'encoder.layer.{block}.'
    if rest.startswith('attn.qkv.'):
      for name, third in zip(('query', 'key', 'value'), np.split(value, 3)):
        out[f'{prefix}attention.attention.{name}.{rest.rsplit(".", 1)[1]}'] = third
    elif rest in parts:  # the layer scales
      out[prefix + parts[rest]] = value
    else:
      module, leaf = rest.rsplit('.', 1)
      out[f'{prefix}{parts[module]}.{leaf}'] = value
  return out


def as_timm(official: dict) -> dict:
  """An official DINOv2 state_dict as timm's checkpoint filter leaves it: no mask token; with registers
  `reg_token`, the class position folded into the class token and `pos_embed` over the patches only."""
  out = {k: v for k, v in official.items() if k != 'mask_token'}
  if 'register_tokens' in out:
    out['reg_token'] = out.pop('register_tokens')
    out['cls_token'] = out['cls_token'] + out['pos_embed'][:, :1]
    out['pos_embed'] = out['pos_embed'][:, 1:]
  return out
