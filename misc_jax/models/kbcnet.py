"""KBCNet (Jin and Li, 2024): backbone features -> CSFA -> multi-layer 4D correlation -> center-pivot 4D
decoder -> score volume [B, Ha*Wa, Hb, Wb] -> keypoint transfer.

The paper leaves these open (REFERENCE.md section 1); each is a field of `config.model`:
- Backbone (`backbone`): a ResNet whose hyperpixels (by default the last block of layers 2-4, strides 8,
  16 and 32) feed CSFA, or a DINOv2 ViT whose chosen blocks' patch tokens do.
- CSFA: each feature map is projected to `csfa_dim` channels and resampled to the feature grid (cell
  centres aligned, ops/grid.py); at every location the maps' tokens attend to each other (one pre-norm
  transformer layer across them), so each token mixes fine detail with deep semantics. Each aligned token
  gives one layer of the multi-layer correlation, an unclamped cosine (the tokens are signed; see
  `correlate_tokens`).
- Decoder: HSNet's center-pivot blocks (conv + GroupNorm + ReLU, stride on the target dims). The scores are
  a learnt mix of the correlation layers at full resolution plus the decoder's output, upsampled over the
  target dims: the residual keeps full target resolution however much the decoder strides. The mix starts
  as the mean correlation and the decoder's part at zero (`head_inits`).
- Transfer: for every source cell the expected target position (soft-argmax with temperature `beta`, or
  CHM's Gaussian-kernel soft-argmax), read at each keypoint by bilinear interpolation; that is exact for
  an identity map, where CHM's attentive indexing is biased by up to half a cell.
"""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from misc_jax import sharding
from misc_jax.models import resnet
from misc_jax.models import supervision
from misc_jax.ops import conv4d
from misc_jax.ops import correlation
from misc_jax.ops import grid as grids
from misc_jax.ops import soft_argmax

# Splits each pair's correlation volume over the mesh's `spatial` chips (train.check_config asks).
SPLITS_VOLUME = True

VARIANTS = {
    'kbcnet_tiny': dict(stage_sizes=(1, 1, 1, 1), width=16, backbone_norm='group', csfa_dim=32,
                        csfa_heads=2, decoder_features=(8, 16, 16), decoder_kernels=(3, 3, 3),
                        decoder_strides=(2, 2, 1)),
    'kbcnet_r50': dict(stage_sizes=resnet.STAGE_SIZES['resnet50'], width=64, backbone_norm='batch',
                       csfa_dim=128, csfa_heads=4, decoder_features=(16, 64, 128),
                       decoder_kernels=(3, 3, 3), decoder_strides=(2, 2, 1)),
    'kbcnet_r101': dict(stage_sizes=resnet.STAGE_SIZES['resnet101'], width=64, backbone_norm='batch',
                        csfa_dim=128, csfa_heads=4, decoder_features=(16, 64, 128),
                        decoder_kernels=(3, 3, 3), decoder_strides=(2, 2, 1)),
}


def decode_variant(name: str) -> dict:
  """'kbcnet_r101' -> the architecture fields of that variant (a config writes them into config.model)."""
  if name not in VARIANTS:
    raise ValueError(f'unknown KBCNet variant {name!r}; expected one of {sorted(VARIANTS)}')
  return dict(VARIANTS[name])


def backbone_module(model_config):
  """The module of config.model.backbone ('resnet' or 'dinov2'): each builds its Flax backbone
  (`from_config`), says where the score volume's cells sit (`feature_grid`), which of its parameters
  are frozen (`is_frozen`) and puts converted weights in the model's layout (`weights_layout`)."""
  return importlib.import_module(f'misc_jax.models.{model_config.get("backbone", "resnet")}')


def trunk_fields(model_config) -> dict:
  """The fields of the trunk (backbone + CSFA) that KBCNet and the dual path share."""
  c = model_config
  module = backbone_module(c)
  return dict(backbone=module.from_config(c), grid=module.feature_grid(c), csfa_dim=c.csfa_dim,
              csfa_heads=c.csfa_heads, dtype=c.dtype)


def decoder_fields(model_config) -> dict:
  c = model_config
  return dict(decoder_features=tuple(c.decoder_features), decoder_kernels=tuple(c.decoder_kernels),
              decoder_strides=tuple(c.decoder_strides), decoder_stride_dims=c.decoder_stride_dims,
              decoder_groups=c.decoder_groups, decoder_remat=c.get('remat', False))


def from_config(model_config) -> 'KBCNet':
  """config.model -> KBCNet (the transfer and initialisation fields are read by the train step)."""
  c = model_config
  return KBCNet(**trunk_fields(c), **decoder_fields(c), decoder_chunk_rows=c.decoder_chunk_rows,
                num_parts=c.get('num_parts', 0) if c.get('part_loss_weight') else 0,
                refine_dim=c.get('refine_dim', 0))


def feature_grid(model_config) -> grids.Grid:
  """Where the cells of the score volume sit in the input image."""
  return backbone_module(model_config).feature_grid(model_config)


def fine_grid(model_config) -> grids.Grid:
  """Where the cells of the refinement's map (the backbone's first feature map) sit."""
  return backbone_module(model_config).from_config(model_config).grids()[0]


class CSFA(nn.Module):
  """Cross-scale feature alignment: S feature maps, each on its own grid -> aligned tokens
  [B, H, W, S, dim] on the output grid (cell centres matched exactly: ops/grid.py)."""
  dim: int
  heads: int
  mlp_ratio: int = 2
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, feats, feat_grids, out_grid, hw):
    tokens = []
    for s, (f, g) in enumerate(zip(feats, feat_grids)):
      t = nn.Dense(self.dim, dtype=self.dtype, name=f'proj{s}')(f)
      tokens.append(grids.resample(t, (1, 2), g, out_grid, hw))
    x = jnp.stack(tokens, axis=3)  # x: [B, H, W, S, dim]
    x = x + self.param('scale_embedding', nn.initializers.normal(0.02), x.shape[3:])
    y = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype)(y)  # across the S tokens
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.Dense(self.dim * self.mlp_ratio, dtype=self.dtype)(y)
    return x + nn.Dense(self.dim, dtype=self.dtype)(nn.gelu(y))


class KBCNet(nn.Module):
  """(source, target) uint8 images [B, S, S, 3] -> scores [B, Ha*Wa, Hb, Wb] (float32) on `grid`.

  `backbone` is a ResNet (models/resnet.py) or a DINOv2 ViT (models/dinov2.py): a module whose
  `features(images)` are the maps CSFA aligns and `grids()` where their cells sit.
  """
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
  decoder_chunk_rows: int = 0
  num_parts: int = 0
  refine_dim: int = 0
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, source, target):
    dtype = jnp.dtype(self.dtype)
    b = source.shape[0]
    tokens = encode(self, source, target, self.refine_dim)  # [2B, H, W, S, dim]
    if self.refine_dim:
      tokens, fine = tokens
    if self.num_parts:  # read by train_loss (apply(..., mutable='intermediates')), ignored otherwise
      self.sow('intermediates', 'part_logits', part_logits(tokens, self.num_parts))
    hw = tokens.shape[1:3]
    src, trg = tokens[:b], tokens[b:]
    decoder = conv4d.CenterPivotStack(self.decoder_features, self.decoder_kernels, self.decoder_strides,
                                      self.decoder_groups, dtype, self.decoder_stride_dims,
                                      self.decoder_remat, name='decoder')
    head_dtypes = dict(refine_head=dtype, corr_head=None)  # the correlation head reads float32

    rows, spatial = self.decoder_chunk_rows, sharding.spatial_size()
    if (rows or spatial > 1) and not self.is_initializing():  # initialising takes the plain path
      # Rows of the image the decoder does not stride, in a volume with its dims first.
      first, second = (trg, src) if self.decoder_stride_dims == 'source' else (src, trg)
      out = _scores_by_rows(decoder, self.variables['params'], head_dtypes, first, second, rows, spatial)
      out = conv4d.unstrided_first(self.decoder_stride_dims, out)
    else:
      corr = correlate_tokens(src, trg)  # float32 [B, Ha, Wa, Hb, Wb, S]
      inits = head_inits(corr.shape[-1])
      heads = {name: nn.Dense(1, dtype=d, kernel_init=inits[name], name=name)
               for name, d in head_dtypes.items()}
      out = score_volume(decoder(corr), corr, **heads, stride_dims=self.decoder_stride_dims)
    out = out.reshape(b, hw[0] * hw[1], *hw)
    return {'scores': out, 'fine': fine} if self.refine_dim else out


def _scores_by_rows(decoder, params, head_dtypes, first, second, rows: int, spatial: int):
  """The scores [B, H1, W1, H2, W2] of the volume correlate(first, second) (the `unstrided_first` layout:
  cosines are symmetric), computed by rows of `first`: split over the `spatial` chips of the mesh the
  caller set with `jax.set_mesh` (conv4d.spatial_stack), or else `rows` at a time (conv4d.chunked_stack).
  Either way no chip holds the whole volume; the loss and read-out after it are partitioned by XLA."""
  def head(params):  # the score heads as a pure function: it runs inside lax.map / shard_map
    heads = {name: functools.partial(nn.Dense(1, dtype=d, parent=None).apply, {'params': params[name]})
             for name, d in head_dtypes.items()}
    return functools.partial(score_volume, **heads, stride_dims='target')

  params = {name: params[name] for name in ('decoder', *head_dtypes)}
  if spatial == 1:
    margin = sum(k // 2 for k in decoder.kernel_sizes)
    padded = jnp.pad(first, [(0, 0), (margin, margin)] + [(0, 0)] * 3)  # zero rows: zero correlation
    volume_rows = lambda start, n: correlate_tokens(
        jax.lax.dynamic_slice_in_dim(padded, start + margin, n, axis=1), second)
    return conv4d.chunked_stack(decoder, params['decoder'], volume_rows, first.shape[1], rows, head(params))
  if first.shape[1] % spatial:
    raise ValueError(f'config.mesh.spatial={spatial} must divide the feature grid\'s {first.shape[1]} rows')

  def local(params, first, second):  # one chip: its rows of `first`, all of `second`
    corr = correlate_tokens(first, second)
    return head(params)(conv4d.spatial_stack(decoder, params['decoder'], corr), corr)

  pairs = jax.sharding.PartitionSpec(sharding.DATA_AXES)
  by_rows = jax.sharding.PartitionSpec(sharding.DATA_AXES, 'spatial')
  return jax.shard_map(local, in_specs=(jax.sharding.PartitionSpec(), by_rows, pairs), out_specs=by_rows)(
      params, first, second)


def part_logits(tokens, num_parts: int):
  """Every cell's logits over the dataset's parts (category x point slot), from its tokens [2B, H, W, S,
  dim] -> float32 [2B, H, W, num_parts]: the head of the part-classification loss (`part_loss`)."""
  return nn.Dense(num_parts, name='part_head')(tokens.mean(3)).astype(jnp.float32)


def score_volume(decoded, corr, refine_head, corr_head, stride_dims: str):
  """The scores: a learnt mix of the correlation layers corr [B, Ha, Wa, Hb, Wb, S] plus the decoder's
  refinement of decoded [B, Ha', Wa', Hb', Wb', C], brought back over its strided dims (cell centres
  aligned: a stride-f output cell i sits on input cell f * i) -> float32 [B, Ha, Wa, Hb, Wb]."""
  refine = refine_head(decoded)[..., 0].astype(jnp.float32)
  axes = (1, 2) if stride_dims == 'source' else (3, 4)
  factor = corr.shape[axes[0]] / refine.shape[axes[0]]
  refine = grids.resample(refine, axes, grids.Grid(factor, 0.), grids.Grid(1, 0.),
                          [corr.shape[a] for a in axes])
  return corr_head(corr)[..., 0] + refine


def encode(model, source, target, fine_dim: int = 0):
  """The trunk that KBCNet and the dual-path model share, called inside `model`'s compact __call__
  (its submodules 'backbone' and 'csfa' belong to `model`): (source, target) uint8 [B, S, S, 3] -> CSFA
  tokens [2B, H, W, feature maps, csfa_dim] on model.grid (H = W = ceil(S / stride)), source images
  first; with `fine_dim`, also unit-length descriptors [2B, h, w, fine_dim] of the first (finest) feature
  map, on its own grid (for `refine_keypoints`)."""
  dtype = jnp.dtype(model.dtype)
  images = resnet.normalize_images(jnp.concatenate([source, target]), dtype)  # [2B, S, S, 3]
  maps = model.backbone.features(images)
  hw = (-(-source.shape[1] // int(model.grid.stride)),) * 2
  tokens = CSFA(model.csfa_dim, model.csfa_heads, dtype=dtype, name='csfa')(
      maps, model.backbone.grids(), model.grid, hw)
  if not fine_dim:
    return tokens
  fine = nn.Dense(fine_dim, name='fine_proj')(maps[0]).astype(jnp.float32)
  return tokens, correlation.l2_normalize(fine, 1e-6, eps_inside_sqrt=True)


def correlate_tokens(src, trg):
  """CSFA tokens src [B, Ha, Wa, S, dim], trg [B, Hb, Wb, S, dim] -> float32 [B, Ha, Wa, Hb, Wb, S], the
  cosine of every source with every target token, one layer per scale. Not clamped at 0 as in HSNet, whose
  features follow a ReLU: CSFA tokens are signed, and the clamp would stop the gradient of every negative
  similarity, the true matches' included (docs/training.md: 4.70% vs 4.13% PCK@0.1 on the demo)."""
  return jnp.stack([correlation.correlation(src[..., s, :], trg[..., s, :], clamp=False)
                    for s in range(src.shape[3])], axis=-1)


def head_inits(num_layers: int) -> dict:
  """Kernel initialisers of the score heads: at initialisation the scores are the mean correlation over
  the layers and the decoder's refinement adds nothing (zero-initialised, like a residual branch), so
  training starts from plain feature matching instead of random decoder noise divided by beta."""
  return dict(corr_head=nn.initializers.constant(1 / num_layers), refine_head=nn.initializers.zeros)


def transfer_kwargs(model_config) -> dict:
  """The config.model fields of `predict_keypoints`, and the model's feature grids."""
  c = model_config
  kwargs = dict(grid=feature_grid(c), transfer=c.transfer, beta=c.beta, sigma=c.sigma,
                window=c.get('window', 2.))
  if c.get('refine_dim'):
    kwargs.update(refine=dict(grid=fine_grid(c), radius=c.refine_radius, beta=c.refine_beta))
  return kwargs


TRANSFERS = ('soft_argmax', 'kernel_soft_argmax', 'local_soft_argmax', 'argmax', 'windowed_soft_argmax')


def predict_keypoints(out, kps, valid, image_size: int, *, grid: grids.Grid, transfer: str = 'soft_argmax',
                      beta: float = 0.02, sigma: float = 5., window: float = 2., refine: dict | None = None):
  """Transfers source keypoints [B, N, 2] (pixels of the S x S input; mask `valid` [B, N]) through the
  model's output (scores [B, Ha*Wa, Hb, Wb] on `grid`, or {'scores', 'fine'}) to target pixels [B, N, 2]
  (invalid ones unchanged). `transfer` is 'soft_argmax' (softmax over the target dims at temperature
  beta), 'kernel_soft_argmax' (CHM's, on scores / beta, Gaussian sigma in cells) or 'local_soft_argmax'
  (the softmax times a Gaussian around its mode: shift-invariant, unlike CHM's), all read per source
  cell and interpolated at the keypoint; or keypoint first, as the DINOv2 correspondence line does:
  'argmax' (the keypoint's score row, interpolated from the source cells, -> its best target cell) and
  'windowed_soft_argmax' (the softmax of that row within `window` cells of its best cell); with `refine`
  (transfer_kwargs) and fine descriptors, each prediction is then refined locally (`refine_keypoints`).
  Predictions lie inside the image."""
  scores = out['scores'] if isinstance(out, dict) else out
  vol = correlation.as_volume(scores)  # [B, Ha, Wa, Hb, Wb]
  hb, wb = vol.shape[3:]
  positions = (grid.centres(hb), grid.centres(wb))  # the target cells' pixel centres
  if transfer in ('argmax', 'windowed_soft_argmax'):  # keypoint first: its own score row
    b, ha, wa = vol.shape[:3]
    cells = jnp.clip(grid.to_cells(kps), 0, jnp.array([wa - 1, ha - 1]))  # interpolate, never extrapolate
    rows = soft_argmax.interpolate_at_cells(vol.reshape(b, ha, wa, hb * wb), cells, valid)
    pred = soft_argmax.keypoint_argmax(rows.reshape(*rows.shape[:2], hb, wb), positions, beta,
                                       window if transfer == 'windowed_soft_argmax' else 0.)
  else:  # per source cell, then read at each keypoint
    if transfer == 'soft_argmax':
      coords = soft_argmax.soft_argmax(vol.transpose(0, 3, 4, 1, 2), beta, positions)
    elif transfer == 'kernel_soft_argmax':
      coords = soft_argmax.kernel_soft_argmax(vol / beta, sigma, positions)
    elif transfer == 'local_soft_argmax':
      coords = soft_argmax.local_soft_argmax(vol, beta, sigma, positions)
    else:
      raise ValueError(f'unknown transfer {transfer!r}; expected one of {TRANSFERS}')
    pred = soft_argmax.interpolate_at_cells(coords, grid.to_cells(kps), valid)
  pred = jnp.clip(pred, 0, image_size)  # the read-out extrapolates past the outer cells; stay in the image
  if refine and isinstance(out, dict) and 'fine' in out:
    b = kps.shape[0]
    pred = refine_keypoints(out['fine'][:b], out['fine'][b:], kps, pred, valid, image_size, **refine)
  return jnp.where(valid[..., None], pred, kps)  # invalid keypoints: unchanged


def refine_keypoints(fine_src, fine_trg, kps, centres, valid, image_size: int, *, grid: grids.Grid,
                     radius: float, beta: float):
  """Sub-cell refinement: each source keypoint's fine descriptor (read at the keypoint) against every
  target descriptor; the prediction is the expected position under softmax(cosine / beta - d^2 / (2
  radius^2)), d the distance in fine cells to its coarse match `centres` [B, N, 2] (a Gaussian window).
  fine_* [B, h, w, F] on `grid` -> [B, N, 2] pixels, inside the image. One matmul per pair: no gathers,
  which are slow on CPUs."""
  desc = soft_argmax.interpolate_at_cells(fine_src, grid.to_cells(kps), valid)  # [B, N, F]
  cosine = jnp.einsum('bnf,bhwf->bnhw', desc, fine_trg)  # [B, N, h, w]
  h, w = cosine.shape[-2:]
  u = grid.to_cells(centres)  # [B, N, 2] (x, y)
  d2 = (jnp.arange(w) - u[..., 0, None])[..., None, :]**2 + (jnp.arange(h) - u[..., 1, None])[..., :, None]**2
  logits = cosine / beta - d2 / (2 * radius**2)
  p = jax.nn.softmax(logits.reshape(*logits.shape[:-2], h * w), -1).reshape(logits.shape)
  pred = jnp.stack([(p.sum(-2) * grid.centres(w)).sum(-1), (p.sum(-1) * grid.centres(h)).sum(-1)], -1)
  return jnp.clip(pred, 0, image_size)


# ----------------------------------------------------------------------------------------------------------
# Loss (the supervised points and the terms on them: models/supervision.py).
# ----------------------------------------------------------------------------------------------------------


def train_loss(apply, batch, config):
  """The training loss of a batch and its parts: every annotated source instance's points (its keypoints,
  and the dataset's dense points when the pipeline provides them: config.input.max_dense_points) are
  transferred, and a pair's loss is the mean over its source instances.

  loss = match_loss_weight * cross-entropy of the score rows against the true target cells
         + transfer_loss_weight * distance of the soft-argmax prediction to the closest target instance.

  `apply(source_images, target_images)` runs the model with the parameters being trained.
  """
  return output_loss(*apply_with_parts(apply, batch, config), batch, config)


def output_loss(out, parts, batch, config):
  """`train_loss` of the model's output `out` on the batch, `parts` the loss terms computed with it
  (`apply_with_parts`), added to the total as weighted by config.model."""
  m = config.model
  size, grid = config.input.image_size, feature_grid(m)
  src, trg = batch['source'], batch['target']
  scores = out['scores'] if isinstance(out, dict) else out
  src_points, src_valid = supervision.training_points(src)  # [B, I, N, 2], [B, I, N]
  trg_points, trg_valid = supervision.training_points(trg)  # [B, J, N, 2], [B, J, N]
  if isinstance(out, dict):  # the refinement stage
    parts['refine_loss'] = refine_loss(out['fine'], src_points, src_valid, trg_points, trg_valid, size, m)

  def one_instance(points, points_valid):  # [B, N, 2], [B, N] -> per-pair EPE, cross-entropy, any valid [B]
    valid = points_valid[:, None] & trg_valid
    # The whole-target soft-argmax, whatever model.transfer (the prediction rule) says: its gradient
    # reaches every target cell. On the synthetic demo, training with the kernel soft-argmax instead gave
    # 3.55% PCK@0.1 against 4.13% (docs/training.md).
    pred = predict_keypoints(scores, points, points_valid, size, grid=grid, transfer='soft_argmax',
                             beta=m.beta)
    err, _, has_any = supervision.match_instances(pred, trg_points, valid, size)
    nll = supervision.match_loss(scores, points, points_valid, trg_points, valid, grid, m.beta,
                                 m.match_targets)
    return err, nll, has_any

  err, nll, has_any = jax.vmap(one_instance, in_axes=1, out_axes=1)(src_points, src_valid)  # [B, I]
  per_pair = lambda x: (x.sum(1) / jnp.maximum(has_any.sum(1), 1)).mean()  # a pair without any adds 0
  transfer, match = per_pair(err), per_pair(nll)
  loss = m.transfer_loss_weight * transfer + m.match_loss_weight * match
  loss += m.get('part_loss_weight', 0.) * parts.get('part_loss', 0.)
  loss += m.get('refine_loss_weight', 0.) * parts.get('refine_loss', 0.)
  return loss, {'transfer_loss': transfer, 'match_loss': match, **parts}


def refine_loss(fine, src_points, src_valid, trg_points, trg_valid, image_size: int, model_config):
  """The refinement's error (in image sides) when its window is centred near the truth: for every source
  point and every target instance holding it, the window's centre is the true position shifted by up to
  one coarse cell (a fixed spread of shifts over the point slots), as a coarse match would miss it."""
  m = model_config
  b, n = src_points.shape[0], src_points.shape[2]
  # Shifts of up to one coarse cell in both axes, spread over the slots (a golden-ratio sequence).
  phase = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.array([0.618034, 0.754878])
  shift = (2 * (phase % 1.) - 1) * feature_grid(m).stride  # [N, 2]
  grid = fine_grid(m)

  def one(points, valid):  # one source instance [B, N, 2] against every target instance -> sum, count
    refine = lambda centres: refine_keypoints(fine[:b], fine[b:], points, centres, valid, image_size,
                                              grid=grid, radius=m.refine_radius, beta=m.refine_beta)
    pred = jax.vmap(refine, in_axes=1, out_axes=1)(trg_points + shift)  # [B, J, N, 2]
    both = valid[:, None] & trg_valid  # [B, J, N]
    err = jnp.linalg.norm(pred - trg_points, axis=-1) / image_size
    return (err * both).sum(), both.sum()

  total, count = jax.vmap(one, in_axes=(1, 1))(src_points, src_valid)
  return total.sum() / jnp.maximum(count.sum(), 1)


def apply_with_parts(apply, batch, config):
  """The model's output on the batch's images, and {'part_loss': ...} when config.model.part_loss_weight
  asks for it (the part logits the model sows: `part_logits`), else {}."""
  images = (batch['source']['image'], batch['target']['image'])
  if not config.model.get('part_loss_weight'):
    return apply(*images), {}
  out, inter = apply(*images, mutable='intermediates')
  return out, {'part_loss': supervision.part_loss(inter['intermediates']['part_logits'][0], batch,
                                                  feature_grid(config.model))}
