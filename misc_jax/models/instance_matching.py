"""Set prediction of instance masks (DETR, Mask2Former): predicted masks matched to the true instances
by the Hungarian algorithm, the loss of the matched masks and of every query's objectness, and the loss of
the masks' predicted IoU (Mask Scoring R-CNN)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize


def hungarian(cost, valid):
  """Minimum-cost assignment of queries to ground-truth instances, on the host (scipy).

  cost [B, Q, G], valid [B, G] -> the query of each ground truth [B, G] int32 (-1 where not valid).
  Needs Q >= the number of valid ground truths.
  """
  def host(cost, valid):
    cost, valid = np.asarray(cost), np.asarray(valid)
    out = np.full(valid.shape, -1, np.int32)
    for n in np.ndindex(valid.shape[:-1]):
      cols = np.flatnonzero(valid[n])
      if cols.size:
        rows, picked = scipy.optimize.linear_sum_assignment(cost[n][:, cols])
        out[n][cols[picked]] = rows
    return out

  return jax.pure_callback(host, jax.ShapeDtypeStruct(valid.shape, jnp.int32), cost, valid,
                           vmap_method='sequential')


def mask_costs(logits, gt):
  """Per-cell-mean BCE and Dice loss of every query [B, Q, H, W] against every truth [B, G, H, W]
  (soft, in [0, 1]) -> [B, Q, G] each."""
  p = jax.nn.sigmoid(logits).reshape(*logits.shape[:2], -1)
  t = gt.reshape(*gt.shape[:2], -1)
  log_p = jax.nn.log_sigmoid(logits).reshape(p.shape)
  log_not_p = jax.nn.log_sigmoid(-logits).reshape(p.shape)
  bce = -(jnp.einsum('bqn,bgn->bqg', log_p, t) + jnp.einsum('bqn,bgn->bqg', log_not_p, 1 - t)) / t.shape[-1]
  dice = 1 - (2 * jnp.einsum('bqn,bgn->bqg', p, t) + 1) / (p.sum(-1)[..., None] + t.sum(-1)[:, None] + 1)
  return bce, dice


def mask_loss(logits, objectness, gt, gt_valid, objectness_cost: float = 0., no_object_weight: float = 1.):
  """Hungarian-matched mask loss of one image side.

  logits [B, Q, H, W], objectness [B, Q], gt [B, G, H, W] (cell fractions), gt_valid [B, G] ->
  (loss per pair [B], the query matched to each truth [B, G]). The matching cost is BCE + Dice, minus
  `objectness_cost` x each query's objectness probability (DETR's class term: the confident queries take
  the instances, so a query's objectness and its assignments agree from batch to batch). The objectness
  BCE weighs the unmatched queries by `no_object_weight` (DETR's and Mask2Former's eos_coef, 0.1 there):
  most queries match nothing, and at weight 1 they pull every query's objectness down.
  """
  bce, dice = mask_costs(logits, gt)
  cost = bce + dice - objectness_cost * jax.nn.sigmoid(objectness)[..., None]
  match = hungarian(jax.lax.stop_gradient(cost), gt_valid)
  take = lambda cost: jnp.take_along_axis(cost, jnp.maximum(match, 0)[:, None], 1)[:, 0]  # [B, G]
  count = jnp.maximum(gt_valid.sum(-1), 1)
  matched = ((take(bce) + take(dice)) * gt_valid).sum(-1) / count
  is_object = jnp.zeros_like(objectness).at[jnp.arange(gt.shape[0])[:, None], jnp.maximum(match, 0)].max(
      gt_valid.astype(objectness.dtype))
  bce = jnp.maximum(objectness, 0) - objectness * is_object + jnp.log1p(jnp.exp(-jnp.abs(objectness)))
  weight = is_object + no_object_weight * (1 - is_object)
  return matched + (bce * weight).sum(-1) / weight.sum(-1), match


def mask_scores(logits, axes=(-2, -1)):
  """Mask logits [..., H, W] -> how sure each mask is of itself [...]: the mean probability over the pixels
  it covers (Mask2Former's mask score; 0 for an empty mask). `axes`: the mask's pixel axes."""
  inside = logits > 0
  return (jax.nn.sigmoid(logits) * inside).sum(axes) / jnp.maximum(inside.sum(axes), 1)


def matched_mask_iou(logits, gt, match, gt_valid):
  """IoU of each query's mask (logits > 0) [B, Q, H, W] with the truth [B, G, H, W] (cell fractions) it
  is matched to (`match` [B, G] from `mask_loss`), 0 for a query matched to none -> [B, Q]."""
  pred = (logits > 0).astype(jnp.float32).reshape(*logits.shape[:2], -1)
  true = gt.reshape(*gt.shape[:2], -1)
  inter = jnp.einsum('bqn,bgn->bqg', pred, true)
  union = pred.sum(-1)[..., None] + true.sum(-1)[:, None] - inter
  iou = inter / jnp.maximum(union, 1e-6)
  assigned = (match[:, None, :] == jnp.arange(logits.shape[1])[None, :, None]) & gt_valid[:, None, :]
  return (iou * assigned).sum(-1)


def mask_iou_loss(iou_logits, logits, gt, match, gt_valid):
  """BCE of the predicted IoU logits [B, Q] against `matched_mask_iou` -> per pair [B]. An unmatched
  query's target is 0, even where its mask duplicates a matched one: AP counts a duplicate as a false
  detection, so it should rank low."""
  target = jax.lax.stop_gradient(matched_mask_iou(logits, gt, match, gt_valid))
  return optax.sigmoid_binary_cross_entropy(iou_logits, target).mean(-1)
