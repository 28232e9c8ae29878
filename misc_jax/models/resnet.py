"""ResNet-50/101 (torchvision's v1.5: stride on the 3x3 conv) returning hyperpixel features.

BatchNorm uses running statistics (frozen, as the correspondence peers fine-tune). Param names follow
torchvision's state_dict (`layer3_5/conv2` is `layer3.5.conv2`), so `torchvision_to_flax` is a renaming.
"""

from typing import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

STAGE_SIZES = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}

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


class Bottleneck(nn.Module):
  features: int
  stride: int = 1
  downsample: bool = False
  dtype: jnp.dtype | None = None
  norm: str = 'batch'

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: nn.Conv(f, (k, k), (s, s), [(k // 2, k // 2)] * 2, use_bias=False,
                                         dtype=self.dtype, name=name)
    y = nn.relu(_norm('bn1', self.dtype, self.norm)(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(_norm('bn2', self.dtype, self.norm)(conv(self.features, 3, self.stride, 'conv2')(y)))
    y = _norm('bn3', self.dtype, self.norm)(conv(4 * self.features, 1, 1, 'conv3')(y))
    if self.downsample:
      x = _norm('downsample_bn', self.dtype, self.norm)(conv(4 * self.features, 1, self.stride,
                                                  'downsample_conv')(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """x [B, H, W, 3] (already normalised) -> dict of stem, layer1..4, blocks (every bottleneck output,
  in order) and, with num_classes, logits. `width` 64 is torchvision's; smaller ones make test variants."""
  stage_sizes: Sequence[int]
  num_classes: int | None = None
  width: int = 64
  dtype: jnp.dtype | None = None
  norm: str = 'batch'  # see _norm

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (7, 7), (2, 2), [(3, 3)] * 2, use_bias=False, dtype=self.dtype,
                name='conv1')(x)
    x = nn.relu(_norm('bn1', self.dtype, self.norm)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), [(1, 1)] * 2)
    out, blocks = {'stem': x}, []
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        x = Bottleneck(self.width * 2**i, stride, j == 0, self.dtype, self.norm,
                       name=f'layer{i + 1}_{j}')(x)
        blocks.append(x)
      out[f'layer{i + 1}'] = x
    out['blocks'] = blocks
    if self.num_classes:
      out['logits'] = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x.mean(axis=(1, 2)))
    return out


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
