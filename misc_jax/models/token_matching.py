"""Zero-shot matching: the cosine similarity of a backbone's feature tokens, nothing learnt on top.

With DINOv2 tokens this is the baseline every foundation-feature method starts from (configs/
dinov2_zero_shot.py: a converted checkpoint evaluated in one command). Scores are the mean over the
backbone's feature maps of the cosine of every source token with every target token; keypoints transfer
as KBCNet's do (soft-argmax at the cells' centres), and the same loss fine-tunes the backbone if asked.
"""

import flax.linen as nn
import jax.numpy as jnp

from misc_jax.models import kbcnet
from misc_jax.models import resnet
from misc_jax.ops import correlation
from misc_jax.ops import grid as grids

# What the trainer and the evaluators use, as KBCNet has them.
predict_keypoints = kbcnet.predict_keypoints
transfer_kwargs = kbcnet.transfer_kwargs
train_loss = kbcnet.train_loss


def from_config(model_config) -> 'TokenMatching':
  module = kbcnet.backbone_module(model_config)
  return TokenMatching(module.from_config(model_config), module.feature_grid(model_config),
                       model_config.dtype)


class TokenMatching(nn.Module):
  """(source, target) uint8 [B, S, S, 3] -> scores [B, H*W, H, W] (float32), the mean token cosine."""
  backbone: nn.Module
  grid: grids.Grid
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, source, target):
    b = source.shape[0]
    images = resnet.normalize_images(jnp.concatenate([source, target]), jnp.dtype(self.dtype))
    maps = self.backbone.features(images)  # each [2B, H, W, D]
    corr = sum(correlation.correlation(m[:b], m[b:], clamp=False) for m in maps) / len(maps)
    h, w = corr.shape[1:3]
    return corr.reshape(b, h * w, *corr.shape[3:]).astype(jnp.float32)
