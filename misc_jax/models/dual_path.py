"""The MISC dual-path model: instance co-segmentation and multi-instance correspondence, learnt together.

MISC210K (Sun et al., CVPR 2023) names its baseline "dual-path collaborative learning" and publishes no
code; this is our design (REFERENCE.md section 1):

  images -> shared ResNet + CSFA (models/kbcnet.py) -> tokens of both images
    correspondence path: multi-scale 4D correlation -> center-pivot decoder -> scores [B, Ha*Wa, Hb, Wb]
    co-segmentation path: Q instance queries per image attend to the tokens of both images (so they look
      for what the two images share) and give Q mask logits and Q objectness logits per image

The paths exchange information, each exchange behind a config switch (for ablations):
- `corr_to_mask`: correspondence evidence sharpens the masks: each cell's best and mean correlation with
  the other image join the mask features (a cell that matches something there is likely the shared object).
- `mask_volume`: masks restrict the 4D volume: the correlation entering the decoder is gated by the
  predicted foreground (union of the instances) of both images.
- `positional_encoding`: sine and cosine encodings of each cell's position join the mask features, so that
  queries can tell look-alike instances of a category apart by where they are.
- `mask_stride`: the masks are drawn on a grid finer than the feature grid (`mask_grid`): the cell
  features, upsampled, plus a small convolutional stem on the image (`PixelStem`) that sees the edges the
  feature grid blurs. The transfer is still restricted on the feature grid (the masks averaged onto it).
- `query_self_attention`: the queries attend to each other as well as to the cells (DETR's decoder).
- `mask_iou_head` (`mask_iou_loss_weight` > 0): a MaskIoU head (Mask Scoring R-CNN) predicts each mask's
  IoU with its instance, to rank the detections; it reads the model behind a stop-gradient.
- always, when the co-segmentation path is on: a source instance's keypoints are transferred into one
  target instance at a time, by restricting the transfer's softmax over the target cells to that instance's
  mask (`restrict`): scores + beta * log(mask), i.e. the match probabilities times the mask.
`coseg=False` removes the co-segmentation path: the model is KBCNet, trained to match the closest target
instance, and cannot tell target instances apart.

Losses (weights in config.model): masks on the mask grid, predicted instances matched to the true ones by
the Hungarian algorithm on BCE + Dice cost, BCE + Dice on matched pairs and BCE on objectness, with the
head the BCE of each mask's predicted IoU (models/instance_matching.py); keypoint transfer (EPE in image
sides, plus the match cross-entropy, supervision.match_loss) for every (true source instance, true target
instance) pair, restricted to the predicted mask matched to the target instance, so that correspondence
errors reach the mask path too (`transfer_on='predicted'`), or to the instance's true mask (`'true'`: the
correspondence path learns as with the instances given, and the masks learn from their own loss alone).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from misc_jax.models import instance_matching
from misc_jax.models import kbcnet
from misc_jax.models import resnet
from misc_jax.models import supervision
from misc_jax.ops import conv4d
from misc_jax.ops import grid as grids

transfer_kwargs = kbcnet.transfer_kwargs
_EPS = 1e-4  # the floor of a restricting mask: log(mask + _EPS)


def from_config(model_config) -> 'DualPath':
  c = model_config
  return DualPath(**kbcnet.trunk_fields(c), **kbcnet.decoder_fields(c), num_queries=c.num_queries,
                  mask_dim=c.mask_dim, coseg=c.coseg, corr_to_mask=c.corr_to_mask, mask_volume=c.mask_volume,
                  positional_encoding=c.get('positional_encoding', False),
                  mask_stride=c.get('mask_stride', 0), mask_iou_head=bool(c.get('mask_iou_loss_weight', 0.)),
                  query_self_attention=c.get('query_self_attention', False),
                  num_parts=c.get('num_parts', 0) if c.get('part_loss_weight') else 0)


class DualPath(nn.Module):
  """(source, target) uint8 [B, S, S, 3] -> {'scores' [B, H*W, H, W], and with the co-segmentation path
  'mask_logits' [2, B, Q, h, w] on the mask grid, 'objectness' [2, B, Q] (index 0: source, 1: target)
  and with `mask_iou_head` 'mask_iou' [2, B, Q] (logits of each mask's predicted IoU with its instance)},
  float32. The trunk is KBCNet's (`backbone`, `grid`: see models/kbcnet.py)."""
  backbone: nn.Module
  grid: grids.Grid
  csfa_dim: int
  csfa_heads: int
  decoder_features: tuple[int, ...]
  decoder_kernels: tuple[int, ...]
  decoder_strides: tuple[int, ...]
  decoder_stride_dims: str = 'source'
  decoder_groups: int = 4
  decoder_remat: bool = False
  dtype: str = 'float32'
  num_queries: int = 6
  mask_dim: int = 32
  coseg: bool = True
  corr_to_mask: bool = True
  mask_volume: bool = True
  positional_encoding: bool = True
  mask_stride: int = 0  # pixels between mask cells (a ResNet-style grid); 0: the feature grid
  mask_iou_head: bool = False  # predict each mask's IoU with its instance (detections' ranking)
  query_self_attention: bool = False  # the queries attend to each other after the cells
  num_parts: int = 0  # > 0: the part-classification head of KBCNet (supervision.part_loss)

  @nn.compact
  def __call__(self, source, target):
    dtype = jnp.dtype(self.dtype)
    b = source.shape[0]
    tokens = kbcnet.encode(self, source, target)  # [2B, H, W, S, dim]
    if self.num_parts:
      self.sow('intermediates', 'part_logits', kbcnet.part_logits(tokens, self.num_parts))
    hw, scales = tokens.shape[1:3], tokens.shape[3]
    corr = kbcnet.correlate_tokens(tokens[:b], tokens[b:])  # [B, H, W, H, W, S] float32
    out = {}
    if self.coseg:
      coseg = self._coseg(tokens.reshape(2 * b, *hw, -1), corr, jnp.concatenate([source, target]))
      out = {k: v.reshape(2, b, *v.shape[1:]) for k, v in coseg.items()}
      if self.mask_volume:
        fg = foreground(out['mask_logits'], out['objectness'])  # [2, B, h, w] on the mask grid
        fg = resample_cells(fg, self.mask_grid(), self.grid, hw[0])  # [2, B, H, W]
        corr = corr * fg[0][:, :, :, None, None, None] * fg[1][:, None, None, :, :, None]
    decoded = conv4d.CenterPivotStack(self.decoder_features, self.decoder_kernels, self.decoder_strides,
                                      self.decoder_groups, dtype, self.decoder_stride_dims,
                                      self.decoder_remat, name='decoder')(corr)
    inits = kbcnet.head_inits(scales)
    scores = kbcnet.score_volume(
        decoded, corr, nn.Dense(1, dtype=dtype, kernel_init=inits['refine_head'], name='refine_head'),
        nn.Dense(1, kernel_init=inits['corr_head'], name='corr_head'), self.decoder_stride_dims)
    out['scores'] = scores.reshape(b, hw[0] * hw[1], *hw)
    return out

  def mask_grid(self) -> grids.Grid:
    return _mask_grid(self.mask_stride, self.grid)

  def _coseg(self, tokens, corr, images):
    """tokens [2B, H, W, C], corr [B, H, W, H, W, S], images uint8 [2B, S, S, 3] -> {'mask_logits'
    [2B, Q, h, w] on the mask grid, 'objectness' [2B, Q], with `mask_iou_head` 'mask_iou' [2B, Q]}."""
    dtype = jnp.dtype(self.dtype)
    b2, h, w, _ = tokens.shape
    feats = nn.Dense(self.mask_dim, dtype=dtype, name='mask_features')(tokens)
    if self.corr_to_mask:
      mean_corr = jax.lax.stop_gradient(corr.mean(-1))  # [B, H, W, H, W]
      flat = mean_corr.reshape(b2 // 2, h * w, h * w)
      evidence = [jnp.stack([flat.max(2), flat.mean(2)], -1),  # source cells: vs every target cell
                  jnp.stack([flat.max(1), flat.mean(1)], -1)]  # target cells: vs every source cell
      evidence = jnp.concatenate(evidence).reshape(b2, h, w, 2)
      feats = feats + nn.Dense(self.mask_dim, dtype=dtype, name='evidence')(evidence)
    feats = nn.gelu(feats)
    if self.positional_encoding:  # where a cell is: look-alike instances differ by position alone
      feats = feats + sinusoidal_positions(h, w, self.mask_dim).astype(feats.dtype)
    pixels = feats  # what the masks are drawn on: the cells, or a finer grid
    if self.mask_stride:
      n = -(-images.shape[1] // self.mask_stride)
      pixels = (grids.resample(feats, (1, 2), self.grid, self.mask_grid(), (n, n))
                + PixelStem(self.mask_dim, self.mask_stride, dtype, name='pixel_stem')(
                    resnet.normalize_images(images, dtype)))
    mask_hw = pixels.shape[1:3]
    pixels = pixels.reshape(b2, -1, self.mask_dim)
    feats = feats.reshape(b2, h * w, self.mask_dim)
    # The queries of an image see its own cells and its partner's (partner: the other half of the batch).
    partner = jnp.roll(feats.reshape(2, b2 // 2, h * w, -1), 1, axis=0).reshape(feats.shape)
    context = jnp.concatenate([feats, partner], axis=1)
    queries = self.param('queries', nn.initializers.normal(1.), (self.num_queries, self.mask_dim))
    q = jnp.broadcast_to(queries, (b2, *queries.shape)).astype(dtype)
    for i in range(2):
      q = q + nn.MultiHeadDotProductAttention(2, dtype=dtype, name=f'query_attention{i}')(
          nn.LayerNorm(dtype=dtype)(q), context)
      if self.query_self_attention:  # the queries see each other (DETR): one instance, one query
        x = nn.LayerNorm(dtype=dtype, name=f'query_self_norm{i}')(q)
        q = q + nn.MultiHeadDotProductAttention(2, dtype=dtype, name=f'query_self_attention{i}')(x, x)
      q = q + nn.Dense(self.mask_dim, dtype=dtype)(nn.gelu(nn.Dense(2 * self.mask_dim, dtype=dtype)(
          nn.LayerNorm(dtype=dtype)(q))))
    embed = nn.Dense(self.mask_dim, dtype=dtype, name='mask_embed')(q)
    logits = jnp.einsum('bqc,bnc->bqn', embed, pixels) / np.sqrt(self.mask_dim)
    objectness = nn.Dense(1, dtype=dtype, name='objectness')(q)[..., 0]
    out = {'mask_logits': logits.reshape(b2, -1, *mask_hw).astype(jnp.float32),
           'objectness': objectness.astype(jnp.float32)}
    if self.mask_iou_head:
      out['mask_iou'] = self._mask_iou(q, logits, pixels).astype(jnp.float32)
    return out

  def _mask_iou(self, queries, logits, pixels):
    """Mask Scoring R-CNN's MaskIoU head: queries [2B, Q, C], mask logits [2B, Q, N], pixel features
    [2B, N, C] -> [2B, Q] logits of the IoU of each query's mask with its instance. It reads the query,
    the features its mask covers, the mask's area and mean confidence, all behind a stop-gradient: it
    ranks the masks and does not change them."""
    dtype = jnp.dtype(self.dtype)
    logits = logits.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits)
    area = (logits > 0).mean(-1, keepdims=True)
    confidence = instance_matching.mask_scores(logits, axes=-1)[..., None]
    covered = jnp.einsum('bqn,bnc->bqc', probs, pixels.astype(jnp.float32)) / (
        probs.sum(-1, keepdims=True) + 1e-6)
    x = jax.lax.stop_gradient(jnp.concatenate(
        [queries.astype(jnp.float32), covered, jnp.log(area + 1e-3), confidence], -1))
    x = nn.gelu(nn.Dense(self.mask_dim, dtype=dtype, name='mask_iou_hidden')(x))
    return nn.Dense(1, dtype=dtype, name='mask_iou')(x)[..., 0]


class PixelStem(nn.Module):
  """Normalised images [B, S, S, 3] -> [B, S / stride, S / stride, dim]: log2(stride) 3 x 3 convolutions
  of stride 2 (ReLU between), output cell i centred on pixel stride * i as a ResNet's (grids.resnet)."""
  dim: int
  stride: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x):
    layers = int(np.log2(self.stride))
    if 2**layers != self.stride:
      raise ValueError(f'config.model.mask_stride={self.stride}: expected a power of 2')
    for i in range(layers):
      last = i == layers - 1
      x = nn.Conv(self.dim if last else max(self.dim // 2, 16), (3, 3), strides=2, padding=1,
                  dtype=self.dtype)(x)
      x = x if last else nn.relu(x)
    return x


def mask_grid(model_config) -> grids.Grid:
  """Where the cells of the mask logits sit in the image (`DualPath.mask_grid`)."""
  return _mask_grid(model_config.get('mask_stride', 0), kbcnet.feature_grid(model_config))


def _mask_grid(stride: int, feature_grid: grids.Grid) -> grids.Grid:
  return grids.resnet(stride) if stride else feature_grid


def feature_grid_regions(maps, model_config, cells: int):
  """Maps [..., h, w] on the mask grid of `model_config` -> [..., cells, cells] on its feature grid."""
  return resample_cells(maps, mask_grid(model_config), kbcnet.feature_grid(model_config), cells)


def sinusoidal_positions(h: int, w: int, dim: int):
  """[h, w, dim] sine and cosine encodings of each cell's row and column (a quarter of dim each, at
  frequencies from 1 to 1 / 100 of a radian per cell), as the transformers' position encodings."""
  freqs = 1. / 100**(np.arange(dim // 4) / max(dim // 4 - 1, 1))
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  angles = [ys[..., None] * freqs, xs[..., None] * freqs]
  out = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], -1)
  return jnp.asarray(np.pad(out, [(0, 0), (0, 0), (0, dim - out.shape[-1])]), jnp.float32)


def foreground(mask_logits, objectness):
  """Probability that a cell belongs to some instance: max over queries of mask x objectness."""
  return (jax.nn.sigmoid(mask_logits) * jax.nn.sigmoid(objectness)[..., None, None]).max(-3)


def restrict(scores, mask, beta: float):
  """Scores [B, Ha*Wa, Hb, Wb] whose softmax (temperature beta) over the target cells is multiplied by
  mask [B, Hb, Wb] in [0, 1]: the transfer can only land inside the mask."""
  return scores + beta * jnp.log(mask + _EPS)[:, None]


def resample_cells(maps, source: grids.Grid, target: grids.Grid, cells: int):
  """Maps [..., h, w] on grid `source` -> [..., cells, cells] on `target`, cell centres aligned (averaged
  where the source is finer)."""
  if source == target:
    return maps
  return grids.resample(maps, (maps.ndim - 2, maps.ndim - 1), source, target, (cells, cells))


def grid_masks(masks, cells: int, grid: grids.Grid):
  """Image masks [..., S, S] bool -> each cell's share of them [..., cells, cells] (pixels averaged
  around the cell's centre on `grid`, linearly weighted)."""
  return resample_cells(masks.astype(jnp.float32), grids.Grid(1, grids.PIXELS_OFFSET), grid, cells)


def upsample_masks(logits, size: int, grid: grids.Grid):
  """Mask logits [..., H, W] on `grid` -> [..., size, size] on the pixels (cell centres aligned)."""
  return resample_cells(logits, grid, grids.Grid(1, grids.PIXELS_OFFSET), size)


def transfer_into(scores, target_masks, src_kps, src_valid, size, model_config, training: bool = False):
  """Source keypoints of every instance [B, I, K, 2] (valid [B, I, K]) transferred into each target
  region target_masks [B, J, Hb, Wb] -> [B, J, I, K, 2]. `training`: by the soft-argmax over the whole
  region, whatever model.transfer (the prediction rule) says, as KBCNet's loss does (kbcnet.train_loss):
  its gradient reaches every cell of the region."""
  b, i, k, _ = src_kps.shape
  kwargs = transfer_kwargs(model_config)
  if training:
    kwargs.update(transfer='soft_argmax')

  def one(mask):
    pred = kbcnet.predict_keypoints(restrict(scores, mask, model_config.beta),
                                    src_kps.reshape(b, i * k, 2), src_valid.reshape(b, i * k),
                                    size, **kwargs)
    return pred.reshape(b, i, k, 2)

  return jax.vmap(one, in_axes=1, out_axes=1)(target_masks)


# ----------------------------------------------------------------------------------------------------------
# Losses (the instance matching and mask loss: models/instance_matching.py).
# ----------------------------------------------------------------------------------------------------------

def instance_pair_targets(batch, dense: bool = False):
  """Source keypoints [B, I, K, 2] and mask [B, I, K]; target keypoints [B, J, K, 2]; valid[B, I, J, K]
  where a keypoint is labelled in source instance i and target instance j. `dense`: the dataset's dense
  points join the keypoints (supervision.training_points), for training."""
  if dense:
    (src, src_valid), (trg, trg_valid) = (supervision.training_points(batch[n]) for n in ('source', 'target'))
  else:
    src, trg = batch['source']['keypoints'], batch['target']['keypoints']
    src_valid, trg_valid = (supervision.annotated(batch[n]) for n in ('source', 'target'))
  return src, src_valid, trg, src_valid[:, :, None] & trg_valid[:, None]


def pair_losses(scores, target_masks, batch, size, model_config):
  """EPE and match cross-entropy of every (source instance, target instance) pair, the transfer
  restricted to target_masks [B, J, Hb, Wb]; averaged over pairs with a valid keypoint, then the batch."""
  src_kps, src_valid, trg_kps, valid = instance_pair_targets(batch, dense=True)
  pred = transfer_into(scores, target_masks, src_kps, src_valid, size, model_config,
                       training=True)  # [B, J, I, K, 2]
  pred = pred.transpose(0, 2, 1, 3, 4)  # [B, I, J, K, 2]
  dist = jnp.sqrt(jnp.sum(((pred - trg_kps[:, None]) / size)**2, -1) + 1e-12)
  count = valid.sum(-1)  # [B, I, J]
  pairs = count > 0
  epe = jnp.where(pairs, (dist * valid).sum(-1) / jnp.maximum(count, 1), 0.)

  def match_ce(mask, j_kps, j_valid):  # one target instance j: every source instance's keypoints
    return jax.vmap(lambda kps, v, tv: supervision.match_loss(
        restrict(scores, mask, model_config.beta), kps, v, j_kps[:, None], tv[:, None],
        kbcnet.feature_grid(model_config), model_config.beta, model_config.match_targets).mean(),
                    in_axes=(1, 1, 1))(src_kps, src_valid, j_valid)  # [I]

  ce = jax.vmap(match_ce, in_axes=(1, 1, 2))(target_masks, trg_kps, valid)  # [J, I]
  num_pairs = jnp.maximum(pairs.sum((1, 2)), 1)
  epe = (epe.sum((1, 2)) / num_pairs).mean()
  # ce holds batch means; averaged here over the instance pairs with any valid keypoint.
  ce = ce.sum() / jnp.maximum(pairs.any(0).sum(), 1)
  return epe, ce


def train_loss(apply, batch, config):
  """The dual-path training loss and its parts (see the module docstring)."""
  model_config, size = config.model, config.input.image_size
  if model_config.coseg and model_config.transfer_on not in ('predicted', 'true'):
    raise ValueError(f"config.model.transfer_on={model_config.transfer_on!r}: expected 'predicted' or 'true'")
  out, parts = kbcnet.apply_with_parts(apply, batch, config)
  scores = out['scores']
  if not model_config.coseg:  # KBCNet: each source instance against its closest target instance
    return kbcnet.output_loss(scores, parts, batch, config)
  grid, cells = scores.shape[-1], out['mask_logits'].shape[-1]
  mask_terms, iou_terms, matches, true_masks = [], [], [], []
  for s, name in enumerate(('source', 'target')):
    side = batch[name]
    has = side['has_masks'].astype(jnp.float32)
    true_masks.append(grid_masks(side['masks'], cells, mask_grid(model_config)))  # [B, G, h, w]
    loss, match = instance_matching.mask_loss(
        out['mask_logits'][s], out['objectness'][s], true_masks[s],
        side['instance_valid'] & side['has_masks'][:, None], model_config.objectness_cost,
        model_config.get('no_object_weight', 1.))
    mask_terms.append((loss * has).sum() / jnp.maximum(has.sum(), 1))
    if 'mask_iou' in out:
      iou_loss = instance_matching.mask_iou_loss(out['mask_iou'][s], out['mask_logits'][s], true_masks[s],
                                                 match, side['instance_valid'])
      iou_terms.append((iou_loss * has).sum() / jnp.maximum(has.sum(), 1))
    matches.append(match)
  # Each true target instance's region: the probability map of the query matched to it, or (`transfer_on
  # ='true'`) the instance's true mask, where the pair has masks.
  probs = jax.nn.sigmoid(out['mask_logits'][1])  # [B, Q, h, w]
  regions = jnp.take_along_axis(probs, jnp.maximum(matches[1], 0)[..., None, None], 1)  # [B, J, h, w]
  if model_config.transfer_on == 'true':
    regions = jnp.where(batch['target']['has_masks'][:, None, None, None], true_masks[1], regions)
  regions = feature_grid_regions(regions, model_config, grid)  # [B, J, H, W]
  epe, ce = pair_losses(scores, regions, batch, size, model_config)
  masks = sum(mask_terms) / 2
  loss = (epe + model_config.match_loss_weight * ce + model_config.mask_loss_weight * masks
          + model_config.get('part_loss_weight', 0.) * parts.get('part_loss', 0.))
  if iou_terms:
    parts['mask_iou_loss'] = sum(iou_terms) / 2
    loss = loss + model_config.mask_iou_loss_weight * parts['mask_iou_loss']
  return loss, {'transfer_loss': epe, 'match_loss': ce, 'mask_loss': masks, **parts}
