r"""Converts an official DINOv2 checkpoint into a backbone for `config.model.backbone_init`.

  python -m misc_jax.tools.convert_dinov2 dinov2_vitb14_pretrain.pth ~/weights/vitb14.msgpack

IN is the state_dict of a hub model (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth` from
dl.fbaipublicfiles.com/dinov2, read with torch.load(weights_only=True): the `torch` extra; or the same as
`.safetensors` / `.npz`). The architecture (size, registers) is read off the arrays and logged; a
checkpoint that does not fit it is refused with the key and shapes named. OUT is a msgpack of {'params'}
in misc_jax.models.dinov2 layout; configs name the same model in `model.dinov2` ('vitb14', 'vitb14_reg').
"""

from typing import Sequence

from absl import app
from absl import logging

from misc_jax.models import dinov2
from misc_jax.tools import convert_resnet


def model_name(state: dict) -> str:
  """The hub model a state_dict belongs to ('vitb14', 'vitg14_reg', ...), from its arrays' shapes."""
  if 'cls_token' not in state or 'patch_embed.proj.weight' not in state:
    raise ValueError(f'not a DINOv2 state_dict (no cls_token / patch_embed.proj.weight among {len(state)} '
                     f'keys, e.g. {list(state)[:3]})')
  dim = state['cls_token'].shape[-1]
  sizes = {arch[0]: name for name, arch in dinov2.SIZES.items()}
  if dim not in sizes:
    raise ValueError(f'cls_token has width {dim}; the DINOv2 widths are {sorted(sizes)}')
  return sizes[dim] + ('_reg' if 'register_tokens' in state else '')


def convert(in_path: str, out_path: str) -> dict:
  """Reads IN, writes OUT, returns the converted {'params'}."""
  state = convert_resnet.load_state_dict(in_path)
  try:
    name = model_name(state)
    variables = dinov2.official_to_flax(state, name)
  except ValueError as e:
    raise ValueError(f'{in_path}: {e}') from None
  num = convert_resnet.write(variables, out_path)
  logging.info('Wrote %s: DINOv2 %s, %d parameters (config: --config.model.dinov2=%s).', out_path, name, num,
               name)
  return variables


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError('usage: python -m misc_jax.tools.convert_dinov2 IN OUT')
  convert(argv[1], argv[2])


if __name__ == '__main__':
  app.run(main)
