"""ResNet-50/101 (torchvision's v1.5: stride on the 3x3 conv) returning hyperpixel features.

BatchNorm uses running statistics (frozen, as the correspondence peers fine-tune). Param names follow
torchvision's state_dict (`layer3_5/conv2` is `layer3.5.conv2`), so `torchvision_to_flax` is a renaming.
Frozen stages (`frozen_stages`) are cut off from the backward pass: their outputs pass through
`stop_gradient`, so no gradient is computed for them at all.

Hyperpixels (DHPF's indexing, which CATs and HSNet use): feature 0 is the stem's output (after the max
pool, stride 4), features 1.. are the bottleneck outputs in order (ResNet-101: 1-3 layer1 (stride 4), 4-7
layer2 (8), 8-30 layer3 (16), 31-33 layer4 (32)). A cell of a stride-s map is centred on pixel s * i
(ops/grid.py: `grid.resnet(s)`).
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from misc_jax.ops import grid

STAGE_SIZES = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}
STAGE_STRIDES = (4, 4, 8, 16, 32)  # stem, layer1..4

# Named hyperpixel sets. 'last': the last block of layers 2-4 (KBCNet's three scales); 'cats': CATs' set
# for ResNet-101 (the stem and seven layer3 blocks); 'hsnet': every block of layers 2-4 (HSNet).
HYPERPIXELS = ('last', 'cats', 'hsnet')
_CATS_RESNET101 = (0, 8, 20, 21, 26, 28, 29, 30)


def hyperpixel_ids(hyperpixels, stage_sizes: Sequence[int]) -> tuple[int, ...]:
  """A name of HYPERPIXELS or DHPF indices (a sequence, or a string '1,2,3,4' as a config field takes them)
  -> the indices, checked against the network."""
  first = np.cumsum((1,) + tuple(stage_sizes))  # index of each stage's first block: layer1 at 1
  if isinstance(hyperpixels, str) and hyperpixels not in HYPERPIXELS:
    try:
      hyperpixels = tuple(int(i) for i in hyperpixels.split(','))
    except ValueError:
      raise ValueError(f'hyperpixels {hyperpixels!r}: expected one of {HYPERPIXELS} or indices such as '
                       '"1,2,3,4"') from None
  if hyperpixels == 'last':
    ids = tuple(int(i) - 1 for i in first[2:])
  elif hyperpixels == 'hsnet':
    ids = tuple(range(int(first[1]), int(first[-1])))
  elif hyperpixels == 'cats':
    if tuple(stage_sizes) != STAGE_SIZES['resnet101']:
      raise ValueError("hyperpixels 'cats' is CATs' set for ResNet-101; give indices for other networks")
    ids = _CATS_RESNET101
  else:
    ids = tuple(int(i) for i in hyperpixels)
  if not ids or min(ids) < 0 or max(ids) >= first[-1]:
    raise ValueError(f'hyperpixels {ids}: indices must lie in 0..{first[-1] - 1} for stage sizes '
                     f'{tuple(stage_sizes)}')
  return ids


def hyperpixel_strides(ids: Sequence[int], stage_sizes: Sequence[int]) -> tuple[int, ...]:
  """The stride of each hyperpixel feature."""
  first = np.cumsum((1,) + tuple(stage_sizes))
  return tuple(STAGE_STRIDES[int(np.searchsorted(first, i, side='right'))] for i in ids)

# The one place images meet ImageNet statistics: torchvision's mean and std of RGB in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_images(images, dtype=jnp.float32):
  """uint8 (or float in [0, 255]) RGB [..., 3] -> (x / 255 - mean) / std, the input every ResNet expects."""
  x = jnp.asarray(images, jnp.float32) / 255.
  return ((x - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)).astype(dtype)


def _norm(name, dtype, kind='batch'):
  """'batch': BatchNorm with frozen running statistics (for pretrained weights); 'group': GroupNorm of
  8 groups, for backbones trained from scratch, where frozen initial statistics normalise nothing."""
  if kind == 'group':
    return nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=dtype, name=name)
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype, name=name)


class _Kernel(nn.Module):
  """Only the kernel of a bias-free nn.Conv, under the same name and path."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return self.param('kernel', nn.initializers.lecun_normal(), self.shape)


class _FrozenStatistics(nn.Module):
  """Only the variables of an nn.BatchNorm (params scale, bias; batch_stats mean, var), same paths."""
  features: int

  @nn.compact
  def __call__(self):
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.features,)).value
    var = self.variable('batch_stats', 'var', jnp.ones, (self.features,)).value
    return scale, bias, mean, var


def conv_norm(x, features: int, kernel: int, stride: int, conv_name: str, norm_name: str, dtype,
              norm: str = 'batch', fold: bool = True):
  """A bias-free convolution and its normalisation. With frozen BatchNorm statistics and `fold` the two
  are one convolution: kernel * scale / sqrt(var + eps) and bias - mean * scale / sqrt(var + eps), computed
  from the same parameters (so checkpoints and gradients are unchanged) and saving a pass over the
  activations forward and backward (issue: accelerator efficiency)."""
  padding = [(kernel // 2, kernel // 2)] * 2
  if norm != 'batch' or not fold:
    y = nn.Conv(features, (kernel, kernel), (stride, stride), padding, use_bias=False, dtype=dtype,
                name=conv_name)(x)
    return _norm(norm_name, dtype, norm)(y)
  w = _Kernel((kernel, kernel, x.shape[-1], features), name=conv_name)()
  scale, bias, mean, var = _FrozenStatistics(features, name=norm_name)()
  factor = scale * jax.lax.rsqrt(var + 1e-5)  # float32, as nn.BatchNorm computes it
  w, x = nn.dtypes.promote_dtype(w * factor, x, dtype=dtype)
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y + (bias - mean * factor).astype(y.dtype)


class Bottleneck(nn.Module):
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype | None = None
  norm: str = 'batch'
  fold_batchnorm: bool = True

  @nn.compact
  def __call__(self, x):
    unit = lambda x, f, k, s, i, prefix='': conv_norm(
        x, f, k, s, f'{prefix}conv{i}', f'{prefix}bn{i}', self.dtype, self.norm, self.fold_batchnorm)
    y = nn.relu(unit(x, self.features, 1, 1, 1))
    y = nn.relu(unit(y, self.features, 3, self.stride, 2))
    y = unit(y, 4 * self.features, 1, 1, 3)
    if self.downsample:
      x = conv_norm(x, 4 * self.features, 1, self.stride, 'downsample_conv', 'downsample_bn', self.dtype,
                    self.norm, self.fold_batchnorm)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """x [B, H, W, 3] (already normalised) -> dict of stem, layer1..4, blocks (every bottleneck output,
  in order) and, with num_classes, logits. `width` 64 is torchvision's; smaller ones make test variants.
  `frozen_stages` 1 freezes the stem, 2 the stem and layer1, and so on (see the module docstring).

  As the correspondence models' backbone: `features(x)` gives the `hyperpixels` maps, `grids()` where
  their cells sit (the interface misc_jax/models/dinov2.py's backbone shares)."""
  stage_sizes: Sequence[int]
  num_classes: int | None = None
  width: int = 64
  dtype: jnp.dtype | None = None
  norm: str = 'batch'  # see _norm
  frozen_stages: int = 0
  hyperpixels: tuple[int, ...] = ()
  fold_batchnorm: bool = True  # see conv_norm

  def features(self, x) -> list:
    out = self(x)
    maps = [out['stem']] + out['blocks']
    return [maps[i] for i in self.hyperpixels]

  def grids(self) -> list[grid.Grid]:
    return [grid.resnet(s) for s in hyperpixel_strides(self.hyperpixels, self.stage_sizes)]

  @nn.compact
  def __call__(self, x):
    x = nn.relu(conv_norm(x, self.width, 7, 2, 'conv1', 'bn1', self.dtype, self.norm, self.fold_batchnorm))
    x = nn.max_pool(x, (3, 3), (2, 2), [(1, 1)] * 2)
    freeze = lambda y, stage: jax.lax.stop_gradient(y) if stage < self.frozen_stages else y
    x = freeze(x, 0)
    out, blocks = {'stem': x}, []
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        x = freeze(Bottleneck(self.width * 2**i, stride, j == 0, self.dtype, self.norm, self.fold_batchnorm,
                              name=f'layer{i + 1}_{j}')(x), i + 1)
        blocks.append(x)
      out[f'layer{i + 1}'] = x
    out['blocks'] = blocks
    if self.num_classes:
      out['logits'] = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x.mean(axis=(1, 2)))
    return out


def from_config(model_config) -> ResNet:
  """config.model -> the backbone of KBCNet and the dual path."""
  c = model_config
  return ResNet(tuple(c.stage_sizes), width=c.width, dtype=jnp.dtype(c.dtype), norm=c.backbone_norm,
                frozen_stages=frozen_stages(c), hyperpixels=hyperpixel_ids(c.hyperpixels, c.stage_sizes),
                fold_batchnorm=c.get('fold_batchnorm', True))


def feature_grid(model_config) -> grid.Grid:
  """The grid of the score volume: a stride-`feature_stride` ResNet map."""
  return grid.resnet(model_config.feature_stride)


def frozen_stages(model_config) -> int:
  """How many stages (the stem is stage 0) are frozen: every one with model.freeze_backbone."""
  c = model_config
  return len(c.stage_sizes) + 1 if c.get('freeze_backbone') else c.freeze_stages


def needs_weights(model_config) -> bool:
  """Frozen BatchNorm statistics only make sense with pretrained weights (the tiny variant uses GroupNorm
  and trains from scratch)."""
  return model_config.backbone_norm == 'batch'


def weights_layout(collections, model_config):
  del model_config
  return collections  # one layout


def is_frozen(path, model_config) -> bool:
  """Whether a backbone parameter (its path below 'backbone', a tuple of names) is frozen."""
  stage = int(path[0][5]) if path[0].startswith('layer') else 0  # layerN_J: stage N; conv1, bn1: 0
  return stage < frozen_stages(model_config)


def torchvision_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A torchvision ResNet state_dict (numpy arrays) -> {'params', 'batch_stats'} for `ResNet`."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    *path, leaf = key.split('.')
    if leaf == 'num_batches_tracked':
      continue
    if len(path) == 4:  # layerN.J.downsample.{0,1}
      path = [f'{path[0]}_{path[1]}', 'downsample_' + ('conv' if path[3] == '0' else 'bn')]
    elif len(path) == 3:  # layerN.J.convK / bnK
      path = [f'{path[0]}_{path[1]}', path[2]]
    value = np.asarray(value, np.float32)
    if leaf == 'weight' and value.ndim == 4:
      tree, leaf, value = params, 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf == 'weight' and value.ndim == 2:
      tree, leaf, value = params, 'kernel', value.T
    elif leaf in ('running_mean', 'running_var'):
      tree, leaf = stats, {'running_mean': 'mean', 'running_var': 'var'}[leaf]
    else:
      tree, leaf = params, {'weight': 'scale', 'bias': 'bias'}[leaf]
    if path == ['fc'] and leaf == 'scale':
      leaf = 'kernel'
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return {'params': params, 'batch_stats': stats}
