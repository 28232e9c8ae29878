r"""Converts a torchvision or timm ResNet-50/101 checkpoint into a backbone (`config.model.backbone_init`).

  python -m misc_jax.tools.convert_resnet resnet101-63fe2227.pth ~/weights/resnet101.msgpack

IN is the model's state_dict (torchvision's, or timm's plain `resnet50` / `resnet101` weights such as
`resnet50.a1_in1k`, which share torchvision's architecture and names; timm's other variants are refused by
name) as `.pth`/`.pt` (read with torch.load(weights_only=True); needs the `torch`
extra: pip install -e '.[torch]'), `.safetensors` or `.npz`. OUT is a msgpack of {'params',
'batch_stats'} in misc_jax.models.resnet layout (flax.serialization); the classifier is dropped.
"""

from typing import Sequence

from absl import app
from absl import logging
from etils import epath
import flax
import numpy as np

from misc_jax.models import resnet


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state_dict from .pth/.pt, .safetensors or .npz, as numpy arrays."""
  suffix = epath.Path(path).suffix
  if suffix in ('.pth', '.pt'):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'{path}: reading .pth needs torch (pip install -e ".[torch]"), or save '
                        'the state_dict as .safetensors or .npz') from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('state_dict', state)  # some trainers wrap it
    return {k: v.numpy() for k, v in state.items()}
  if suffix == '.safetensors':
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    return safetensors_numpy.load_file(path)
  if suffix == '.npz':
    with np.load(path) as data:
      return dict(data)
  raise ValueError(f'{path}: unknown checkpoint type {suffix!r}; expected .pth, .pt, .safetensors '
                   'or .npz')


# Keys of timm ResNet variants whose architecture is not torchvision's, and what each one is.
_OTHER_TIMM_VARIANTS = {
    'conv1.0.weight': "a deep stem of three 3x3 convolutions (timm's resnet*c, resnet*d, resnet*s)",
    'layer1.0.downsample.2.weight': "an average-pool shortcut (timm's resnet*d, resnet*e)",
    'layer1.0.se.fc1.weight': "squeeze-excitation blocks (timm's seresnet*)",
    'layer1.0.conv2.fc1.weight': "split-attention blocks (timm's resnest*)",
    'layer1.0.bn1.num_groups': "group norm (timm's resnet*_gn)",
}


def refuse_other_architectures(state: dict) -> None:
  """torchvision's ResNet-50/101 and timm's plain `resnet50` / `resnet101` (e.g. resnet50.a1_in1k,
  resnet101.tv_in1k: the same architecture and names) pass; timm's other variants are refused by name."""
  for key, what in _OTHER_TIMM_VARIANTS.items():
    if key in state:
      raise ValueError(f'the key {key!r} belongs to a ResNet with {what}, not the torchvision architecture '
                       'this model implements; convert a plain resnet50 / resnet101 checkpoint')
  if 'conv1.weight' not in state or 'layer1.0.conv1.weight' not in state:
    raise ValueError(f'not a torchvision ResNet state_dict (no conv1.weight / layer1.0.conv1.weight among '
                     f'{len(state)} keys, e.g. {list(state)[:3]})')


def convert(in_path: str, out_path: str) -> dict:
  """Reads IN, writes OUT, returns the converted {'params', 'batch_stats'}."""
  state = load_state_dict(in_path)
  try:
    refuse_other_architectures(state)
  except ValueError as e:
    raise ValueError(f'{in_path}: {e}') from None
  variables = resnet.torchvision_to_flax(state)
  variables['params'].pop('fc', None)
  num = write(variables, out_path)
  logging.info('Wrote %s: %d backbone parameters.', out_path, num)
  return variables


def write(variables: dict, out_path: str) -> int:
  """Writes converted {'params', ...} as msgpack (folders created); returns the number of parameters."""
  out = epath.Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(flax.serialization.msgpack_serialize(variables))
  return sum(np.size(v) for v in flax.traverse_util.flatten_dict(variables['params']).values())


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError('usage: python -m misc_jax.tools.convert_resnet IN OUT')
  convert(argv[1], argv[2])


if __name__ == '__main__':
  app.run(main)
