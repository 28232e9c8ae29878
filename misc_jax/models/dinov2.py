"""DINOv2 (Oquab et al., 2023) ViT backbones in Flax, computed as the official code computes them.

Sizes ViT-S/14, B/14, L/14 (MLP feed-forward) and g/14 (SwiGLU), with or without 4 register tokens. Images
[B, H, W, 3] (ImageNet-normalised, H and W multiples of 14) -> 14 x 14 patches embedded by a convolution, a
cls token, the position embedding of the 518 px model (a 37 x 37 grid) resized to the image's patch grid,
the register tokens (between cls and the patches, without position embedding), then pre-norm blocks
x += LayerScale(attention(LN(x))); x += LayerScale(FFN(LN(x))) and a final LayerNorm (eps 1e-6 throughout).

The position embedding is resized exactly as torch's `interpolate` does in the official
`interpolate_pos_encoding` (`bicubic_weights`): the models without registers pass a scale factor
(h0 + 0.1) / 37 and torch then samples at (i + 0.5) / scale - 0.5 with its cubic kernel (a = -0.75),
not at the grid's own ratio; the models with registers pass the size, with antialiasing (torch's
antialiased cubic: Keys' a = -0.5, support widened by the downscale). At 518 px nothing is resized.

Param names follow the official state_dict (`blocks.3.attn.qkv` is `blocks_3/attn/qkv`), so
`official_to_flax` (misc_jax/tools/convert_dinov2.py) is a renaming and transposition. With `scan` the
blocks are one `nn.scan` layer whose parameters are stacked along a leading axis (`blocks/attn/qkv`,
[depth, ...]): one block is compiled instead of `depth`; `weights_layout` moves converted weights (always
written per block) between the two layouts.

As the correspondence models' backbone (the interface of models/resnet.py): `features(images)` gives the
patch tokens of `out_blocks`, each normalised by the final LayerNorm (as `get_intermediate_layers(norm=
True)`), as maps [B, H / 14, W / 14, D]; `grids()` places patch i's token at its centre, 14 * i + 7.
"""

import math
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from misc_jax.ops import grid

PATCH = 14
POS_GRID = 37  # the position embedding's grid: 518 px / 14
# name -> (width, depth, heads, feed-forward); '_reg' variants add 4 register tokens.
SIZES = {'vits14': (384, 12, 6, 'mlp'), 'vitb14': (768, 12, 12, 'mlp'), 'vitl14': (1024, 24, 16, 'mlp'),
         'vitg14': (1536, 40, 24, 'swiglu')}


def architecture(name: str) -> dict:
  """'vitb14' or 'vitb14_reg' -> the DinoV2 fields of the official hub model of that name."""
  size, _, reg = name.partition('_')
  if size not in SIZES or reg not in ('', 'reg'):
    raise ValueError(f'unknown DINOv2 model {name!r}; expected one of '
                     f'{sorted(SIZES) + [s + "_reg" for s in SIZES]}')
  dim, depth, heads, ffn = SIZES[size]
  return dict(dim=dim, depth=depth, heads=heads, ffn=ffn, registers=4 if reg else 0,
              interpolate_offset=0. if reg else 0.1, interpolate_antialias=bool(reg))


# ----------------------------------------------------------------------------------------------------------
# torch's bicubic interpolation, as matrices (computed on the host; shapes are static).
# ----------------------------------------------------------------------------------------------------------

def _cubic(x, a):
  """Keys' cubic convolution kernel at distances x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.))


def bicubic_weights(n_in: int, n_out: int, scale_factor: float | None = None,
                    antialias: bool = False) -> np.ndarray:
  """[n_out, n_in] float64: torch's `interpolate(mode='bicubic', align_corners=False)` along one axis.

  With `scale_factor` (torch: the given factor, not n_out / n_in, sets the sampling positions) output i
  samples input (i + 0.5) / scale_factor - 0.5 with a = -0.75, indices clamped at the border. With
  `antialias` (torch's `_upsample_bicubic2d_aa`, sizes given) a = -0.5 and, when shrinking, the kernel is
  stretched by n_in / n_out and its taps renormalised.
  """
  out = np.zeros((n_out, n_in))
  if not antialias:
    ratio = 1 / scale_factor if scale_factor else n_in / n_out
    for i in range(n_out):
      src = (i + 0.5) * ratio - 0.5
      base = math.floor(src)
      t = src - base
      for tap, w in zip(range(base - 1, base + 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        out[i, min(max(tap, 0), n_in - 1)] += w
    return out
  scale = n_in / n_out
  support = 2. * scale if scale >= 1 else 2.
  inv = 1 / scale if scale >= 1 else 1.
  for i in range(n_out):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)  # C's truncation toward zero, as torch
    hi = min(int(centre + support + 0.5), n_in)
    w = _cubic((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
    out[i, lo:hi] = w / w.sum()
  return out


def resize_position_embedding(pos_embed, h0: int, w0: int, offset: float, antialias: bool):
  """The official interpolate_pos_encoding: pos_embed [1, 1 + 37 * 37, D] -> [1, 1 + h0 * w0, D] for an
  h0 x w0 patch grid (unchanged for 37 x 37)."""
  if (h0, w0) == (POS_GRID, POS_GRID):
    return pos_embed
  size = lambda n: (None, True) if antialias else ((n + offset) / POS_GRID if offset else None, False)
  (sy, aa), (sx, _) = size(h0), size(w0)
  wy = jnp.asarray(bicubic_weights(POS_GRID, h0, sy, aa), jnp.float32)
  wx = jnp.asarray(bicubic_weights(POS_GRID, w0, sx, aa), jnp.float32)
  patches = pos_embed[0, 1:].astype(jnp.float32).reshape(POS_GRID, POS_GRID, -1)
  patches = jnp.einsum('yi,xj,ijd->yxd', wy, wx, patches, precision='highest')  # [h0, w0, D]
  return jnp.concatenate([pos_embed[:, :1], patches.reshape(1, h0 * w0, -1)], 1).astype(pos_embed.dtype)


# ----------------------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
  dim: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, images):  # [B, H, W, 3] -> [B, H / 14 * W / 14, dim]
    x = nn.Conv(self.dim, (PATCH, PATCH), (PATCH, PATCH), 'VALID', dtype=self.dtype, name='proj')(images)
    return x.reshape(x.shape[0], -1, self.dim)


class LayerScale(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x * self.param('gamma', nn.initializers.ones, (x.shape[-1],)).astype(x.dtype)


class Attention(nn.Module):
  heads: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, name='qkv')(x).reshape(b, n, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, heads, D / heads]
    x = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D / heads)) v
    return nn.Dense(d, dtype=self.dtype, name='proj')(x.reshape(b, n, d))


class Mlp(nn.Module):
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(4 * d, dtype=self.dtype, name='fc1')(x), approximate=False)
    return nn.Dense(d, dtype=self.dtype, name='fc2')(x)


class SwiGLU(nn.Module):
  """The official SwiGLUFFNFused (ViT-g): hidden width 2/3 of 4 D rounded up to a multiple of 8."""
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8
    x1, x2 = jnp.split(nn.Dense(2 * hidden, dtype=self.dtype, name='w12')(x), 2, axis=-1)
    return nn.Dense(d, dtype=self.dtype, name='w3')(nn.silu(x1) * x2)


class Block(nn.Module):
  heads: int
  ffn: str
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    x = x + LayerScale(name='ls1')(Attention(self.heads, self.dtype, name='attn')(norm('norm1')(x)))
    ffn = (Mlp if self.ffn == 'mlp' else SwiGLU)(self.dtype, name='mlp')
    return x + LayerScale(name='ls2')(ffn(norm('norm2')(x)))


class _ScanStep(Block):
  """A Block as the body of nn.scan: (x, None) -> (x', x'), every block's output stacked."""

  def __call__(self, x, _):  # pylint: disable=arguments-differ
    x = Block.__call__(self, x)
    return x, x


class DinoV2(nn.Module):
  """images [B, H, W, 3] (normalised; H, W multiples of 14) -> {'prenorm' [B, T, D] (tokens: cls, registers,
  patches), 'norm' (the same after the final LayerNorm), 'blocks' {i: block i's raw output}} for the
  blocks in `out_blocks`. `frozen`: the outputs pass through stop_gradient (no backward pass)."""
  dim: int
  depth: int
  heads: int
  ffn: str = 'mlp'
  registers: int = 0
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  out_blocks: tuple[int, ...] = ()
  frozen: bool = False
  remat: bool = False  # recompute each block in the backward pass instead of keeping its activations
  scan: bool = False  # the blocks as one scanned layer (stacked params, one block compiled)
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, images):
    b, h, w, _ = images.shape
    if h % PATCH or w % PATCH:
      raise ValueError(f'DINOv2 needs image sides that are multiples of {PATCH}; got {h} x {w}')
    h0, w0 = h // PATCH, w // PATCH
    x = PatchEmbed(self.dim, self.dtype, name='patch_embed')(images)  # [B, h0 * w0, D]
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.dim))
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, 1 + POS_GRID**2, self.dim))
    self.param('mask_token', nn.initializers.zeros, (1, self.dim))  # used in training; in the state dict
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], 1)
    x = x + resize_position_embedding(pos, h0, w0, self.interpolate_offset,
                                      self.interpolate_antialias).astype(x.dtype)
    if self.registers:
      reg = self.param('register_tokens', nn.initializers.normal(1e-6), (1, self.registers, self.dim))
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b, self.registers, self.dim)).astype(x.dtype),
                           x[:, 1:]], 1)
    if self.scan:  # every block's output is kept ([depth, B, T, D]); out_blocks are read from it
      step = nn.remat(_ScanStep, prevent_cse=False) if self.remat else _ScanStep
      scanned = nn.scan(step, variable_axes={'params': 0}, split_rngs={'params': True}, length=self.depth)
      x, outputs = scanned(self.heads, self.ffn, self.dtype, name='blocks')(x, None)
      blocks = {i: outputs[i] for i in self.out_blocks}
    else:
      blocks, block = {}, nn.remat(Block) if self.remat else Block
      for i in range(self.depth):
        x = block(self.heads, self.ffn, self.dtype, name=f'blocks_{i}')(x)
        if i in self.out_blocks:
          blocks[i] = x
    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')
    out = {'prenorm': x, 'norm': norm(x), 'blocks': {i: norm(y) for i, y in blocks.items()},
           'raw_blocks': blocks}
    return jax.lax.stop_gradient(out) if self.frozen else out

  def features(self, images) -> list:
    """The normalised patch tokens of `out_blocks` as maps [B, H / 14, W / 14, D], shallow to deep."""
    out = self(images)
    b, h, w, _ = images.shape
    first = 1 + self.registers
    return [out['blocks'][i][:, first:].reshape(b, h // PATCH, w // PATCH, self.dim)
            for i in sorted(self.out_blocks)]

  def grids(self) -> list[grid.Grid]:
    return [grid.patches(PATCH)] * len(self.out_blocks)


def from_config(model_config) -> DinoV2:
  """config.model (backbone 'dinov2') -> the backbone of KBCNet and the dual path: model.dinov2 names the
  official model ('vitb14', 'vits14_reg', ...), model.dinov2_blocks the blocks whose tokens are correlated,
  model.freeze_backbone fixes it."""
  c = model_config
  return DinoV2(**architecture(c.dinov2), out_blocks=tuple(c.dinov2_blocks), frozen=c.freeze_backbone,
                remat=c.get('remat', False), scan=c.get('scan_blocks', False), dtype=jnp.dtype(c.dtype))


def feature_grid(model_config) -> grid.Grid:
  """Patch tokens: the feature stride is the patch size."""
  if model_config.feature_stride != PATCH:
    raise ValueError(f'config.model.feature_stride is {model_config.feature_stride}; DINOv2 patch tokens '
                     f'are {PATCH} px apart')
  return grid.patches(PATCH)


def needs_weights(model_config) -> bool:
  del model_config
  return True  # a foundation model is its weights


def is_frozen(path, model_config) -> bool:
  del path  # all or nothing
  return bool(model_config.freeze_backbone)


def weights_layout(collections: Mapping, model_config) -> dict:
  """Backbone variables {'params': ...} in either layout (blocks_0 ... blocks_{n-1}, or one stacked
  'blocks') -> the layout of config.model.scan_blocks."""
  params = dict(collections['params'])
  per_block = sorted((k for k in params if k.startswith('blocks_')), key=lambda k: int(k.split('_')[1]))
  if model_config.get('scan_blocks', False) and per_block:
    params['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *[params.pop(k) for k in per_block])
  elif not model_config.get('scan_blocks', False) and 'blocks' in params:
    stacked = params.pop('blocks')
    depth = len(jax.tree.leaves(stacked)[0])
    params.update({f'blocks_{i}': jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
                   for i in range(depth)})
  return {**collections, 'params': params}


def official_to_flax(state_dict: Mapping[str, np.ndarray], name: str) -> dict:
  """An official DINOv2 state_dict (numpy arrays) of model `name` -> {'params'} for `DinoV2`; a key that
  the model does not have, a missing key or a shape that does not fit is refused, named."""
  expected = jax.eval_shape(lambda: DinoV2(**architecture(name)).init(
      jax.random.key(0), jnp.zeros((1, PATCH, PATCH, 3))))['params']
  expected = {'.'.join(k): v.shape for k, v in _flatten(expected).items()}
  params, seen = {}, set()
  for key, value in state_dict.items():
    path = key.split('.')
    if path[0] == 'blocks':  # blocks.3.attn.qkv.weight -> blocks_3/attn/qkv/kernel
      path = [f'blocks_{path[1]}'] + path[2:]
    value = np.asarray(value, np.float32)
    leaf = path[-1]
    if leaf == 'weight' and value.ndim == 4:  # the patch embedding, OIHW -> HWIO
      path[-1], value = 'kernel', value.transpose(2, 3, 1, 0)
    elif leaf == 'weight' and value.ndim == 2:
      path[-1], value = 'kernel', value.T
    elif leaf == 'weight':
      path[-1] = 'scale'  # LayerNorm
    flat = '.'.join(path)
    if flat not in expected:
      raise ValueError(f'{name}: the checkpoint key {key!r} (shape {value.shape}) has no place in the model')
    if tuple(value.shape) != tuple(expected[flat]):
      raise ValueError(f'{name}: {key!r} has shape {value.shape}, the model expects {tuple(expected[flat])}')
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
    seen.add(flat)
  missing = sorted(set(expected) - seen)
  if missing:
    official = [re.sub(r'\.(kernel|scale)$', '.weight', m.replace('blocks_', 'blocks.')) for m in missing]
    raise ValueError(f'{name}: the checkpoint lacks {len(missing)} arrays, e.g. {official[:3]}')
  return {'params': params}


def _flatten(tree, prefix=()):
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flatten(sub, prefix + (key,)).items()}

