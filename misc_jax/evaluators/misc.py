"""Multi-instance evaluator (MISC210K protocol, REFERENCE.md section 1; the official metric is not public).

Co-segmentation, on both images of every pair: predicted instances are the queries whose objectness
exceeds `config.eval.objectness_threshold`, with masks upsampled to the input. They are matched to the
true instances by the Hungarian algorithm on IoU. Our instance metrics, named for what they are:
- `matched_iou`: mean over true instances of the IoU with the matched prediction (0 when unmatched): an
  instance-matched IoU, not the co-segmentation Jaccard index;
- `ap50_all_point`: average precision at IoU 0.5 of every query with a non-empty mask, ranked as COCO
  ranks all detections (greedy matching), pooled over the split, with all-point interpolation (the area
  under the precision envelope), by objectness x the mask's predicted IoU (Mask Scoring R-CNN's ranking;
  `config.model.mask_iou_loss_weight` > 0), or without that head objectness x mask score (the mean
  probability inside the mask: Mask2Former's, `instance_matching.mask_scores`); each score then decays by
  its mask's overlap with better-ranked masks (`matrix_nms`, SOLOv2's, strength
  `config.eval.matrix_nms_sigma`; 0 or absent: off), so a duplicate ranks below the distinct detections.
  AP does not depend on the threshold.
The standard definitions beside them:
- `ap50_coco`: the same detections and matches, COCO's 101-point interpolation (pycocotools' `segm` AP at
  IoU 0.5 with one category; tests/test_dual_path.py checks it against pycocotools);
- `coseg_jaccard`: the co-segmentation Jaccard index: per image, the IoU of the union of the predicted
  instances' masks with the union of the true ones, averaged over images.

Correspondence, for every pair (source instance i, target instance j) with a keypoint labelled in both:
the source keypoints of i are transferred into j, and PCK@alpha counts those within alpha * max(w, h) of
j's box. Per-pair PCK is averaged over instance pairs.
- `pck_oracle@a`: the transfer is restricted to j's true mask (instances given);
- `pck@a` (the real setting): restricted to the predicted instance matched to j; a j left unmatched
  scores 0. A model without the co-segmentation path transfers without restriction.
- `by_instances`: both, split by the number of instances in the target image (1, 2, 3+).
"""

import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import matplotlib
import numpy as np
import scipy.optimize

from misc_jax import input_pipeline
from misc_jax import sharding
from misc_jax.models import dual_path
from misc_jax.models import instance_matching
from misc_jax.models import kbcnet

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

BUCKETS = ('1', '2', '3+')


def eval_step(state, batch, *, config):
  """Device outputs of one batch: masks, objectness, and the keypoints transferred into every region."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  out = state.apply_fn(variables, batch['source']['image'], batch['target']['image'])
  if not isinstance(out, dict):  # KBCNet: scores alone
    out = {'scores': out}
  size = config.input.image_size
  scores = out['scores']
  grid = scores.shape[-1]
  src_kps, src_valid, _, _ = dual_path.instance_pair_targets(batch)
  transfer = functools.partial(dual_path.transfer_into, scores, src_kps=src_kps, src_valid=src_valid,
                               size=size, model_config=config.model)
  cells = kbcnet.feature_grid(config.model)
  true_regions = dual_path.grid_masks(batch['target']['masks'], grid, cells)
  result = {'oracle': transfer(true_regions)}  # [B, J, I, K, 2]
  if 'mask_logits' in out:
    logits = out['mask_logits']  # [2, B, Q, H, W]
    result['queries'] = transfer(dual_path.feature_grid_regions(jax.nn.sigmoid(logits[1]), config.model,
                                                                grid))  # [B, Q, I, K, 2]
    pixels = dual_path.upsample_masks(logits, size, dual_path.mask_grid(config.model))  # [2, B, Q, S, S]
    result['masks'] = pixels > 0
    result['objectness'] = jax.nn.sigmoid(out['objectness'])  # [2, B, Q]
    quality = jax.nn.sigmoid(out['mask_iou']) if 'mask_iou' in out else instance_matching.mask_scores(pixels)
    result['detection_scores'] = result['objectness'] * quality
  else:
    result['queries'] = transfer(jnp.ones((scores.shape[0], 1, grid, grid)))  # [B, 1, I, K, 2]
  return result


def mask_iou(pred, gt):
  """IoU of every predicted mask [P, H, W] with every true one [G, H, W] (bool) -> [P, G]."""
  p = pred.reshape(pred.shape[0], int(np.prod(pred.shape[1:]))).astype(np.float64)
  g = gt.reshape(gt.shape[0], int(np.prod(gt.shape[1:]))).astype(np.float64)
  inter = p @ g.T
  union = p.sum(1)[:, None] + g.sum(1)[None] - inter
  return np.where(union > 0, inter / np.maximum(union, 1), 0.)


def match_instances(iou):
  """Hungarian matching on IoU [P, G] -> the prediction of each truth [G] (-1: none, or IoU 0)."""
  out = np.full(iou.shape[1], -1)
  if iou.size:
    rows, cols = scipy.optimize.linear_sum_assignment(-iou)
    keep = iou[rows, cols] > 0
    out[cols[keep]] = rows[keep]
  return out


def greedy_true_positives(scores, iou, threshold=0.5):
  """COCO-style: predictions in decreasing score each take the unclaimed truth of highest IoU >= threshold.
  scores [P], iou [P, G] -> bool [P]."""
  tp = np.zeros(len(scores), bool)
  claimed = np.zeros(iou.shape[1], bool)
  for p in np.argsort(-scores, kind='stable'):
    candidates = np.where(claimed, -1., iou[p])
    if candidates.size and candidates.max() >= threshold:
      g = int(candidates.argmax())
      claimed[g], tp[p] = True, True
  return tp


def average_precision(scores, tp, num_truths, recall_points: int | None = None):
  """AP of detections (scores [N], tp [N]) against num_truths: all-point interpolation (the area under the
  precision envelope), or with `recall_points` (COCO: 101) the envelope's mean at that many recalls from 0
  to 1 (0 beyond the largest recall reached)."""
  if num_truths == 0:
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  hits = tp[order].astype(np.float64)
  recall = np.cumsum(hits) / num_truths
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(hits) else precision
  if recall_points:
    at = np.searchsorted(recall, np.linspace(0, 1, recall_points), side='left')
    return float(np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.).mean()
                 if len(envelope) else 0.)
  steps = np.diff(np.concatenate([[0.], recall]))
  return float((steps * envelope).sum())


def matrix_nms(scores, masks, sigma):
  """SOLOv2's Matrix NMS: detection scores [P] decay by the overlap of each mask (bool [P, H, W]) with the
  better-ranked ones, by exp(-sigma IoU^2), less the decay that better mask takes itself (a mask suppressed
  by a third one suppresses less) -> scores [P]. sigma 0 returns the scores unchanged."""
  if not sigma or len(scores) < 2:
    return scores
  order = np.argsort(-scores, kind='stable')
  ranked = masks[order]
  iou = np.triu(mask_iou(ranked, ranked), k=1)  # [i, j]: i ranked above j
  own = iou.max(0)  # each mask's largest overlap with a better-ranked one
  decay = np.exp(-sigma * (iou ** 2 - own[:, None] ** 2)).min(0)
  out = np.empty_like(scores)
  out[order] = scores[order] * decay
  return out


def pair_pck(pred, gt, valid, bbox, alphas):
  """PCK of one instance pair: pred, gt [K, 2], valid [K], bbox (x1, y1, x2, y2) -> [A]."""
  threshold = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
  dist = np.hypot(*(pred - gt).T)[valid]
  return np.array([(dist <= a * threshold).mean() for a in alphas])


def pair_records(batch, out, config):
  """Host statistics of one flat batch (leaves [B, ...]) of valid pairs -> dict of fixed-shape arrays."""
  alphas = np.asarray(config.eval.alphas)
  b = len(batch['valid'])
  q_max = out['queries'].shape[1]
  rec = {
      'pck': np.zeros((b, 2, len(BUCKETS), len(alphas))),  # [pair, oracle/predicted, bucket, alpha]
      'pck_pairs': np.zeros((b, len(BUCKETS))),
      'iou_sum': np.zeros(b), 'truths': np.zeros(b), 'jaccard_sum': np.zeros(b), 'images': np.zeros(b),
      'scores': np.full((b, 2, q_max), -1.), 'tp': np.zeros((b, 2, q_max), bool),
  }
  for n in np.flatnonzero(batch['valid']):
    src, trg = batch['source'], batch['target']
    num_trg = int(trg['instance_valid'][n].sum())
    bucket = min(num_trg, 3) - 1
    # Without co-segmentation: the one unrestricted region; without true masks: the likeliest instance.
    assigned = np.zeros(num_trg, int)
    if 'masks' in out:
      assigned[:] = np.argmax(out['objectness'][1, n])
      for s, side in enumerate((src, trg)):
        truths = side['masks'][n][side['instance_valid'][n]]
        if not side['has_masks'][n]:
          continue
        nonempty = np.flatnonzero(out['masks'][s, n].any((1, 2)))
        masks = out['masks'][s, n][nonempty]
        iou_all = mask_iou(masks, truths)
        # AP ranks every detection, as COCO does, by its detection score (`eval_step`) after Matrix NMS;
        # mIoU and PCK take the queries above the objectness threshold.
        scores = matrix_nms(out['detection_scores'][s, n, nonempty], masks,
                            config.eval.get('matrix_nms_sigma', 0.))  # 0 in runs before it
        rec['scores'][n, s, nonempty] = scores
        rec['tp'][n, s, nonempty] = greedy_true_positives(scores, iou_all)
        keep = out['objectness'][s, n, nonempty] > config.eval.objectness_threshold
        preds, iou = nonempty[keep], iou_all[keep]
        match = match_instances(iou)
        rec['iou_sum'][n] += sum(iou[m, g] for g, m in enumerate(match) if m >= 0)
        rec['truths'][n] += len(truths)
        union = lambda m: m.any(0, keepdims=True)  # every instance's mask as one foreground
        rec['jaccard_sum'][n] += mask_iou(union(masks[keep]), union(truths))[0, 0]
        rec['images'][n] += 1
        if s == 1:
          assigned = np.where(match >= 0, preds[np.maximum(match, 0)] if len(preds) else -1, -1)
    for i in np.flatnonzero(src['instance_valid'][n]):
      for j in range(num_trg):
        valid = src['keypoint_valid'][n, i] & trg['keypoint_valid'][n, j]
        if not valid.any():
          continue
        gt, bbox = trg['keypoints'][n, j], trg['bboxes'][n, j]
        rec['pck'][n, 0, bucket] += pair_pck(out['oracle'][n, j, i], gt, valid, bbox, alphas)
        if assigned[j] >= 0:
          rec['pck'][n, 1, bucket] += pair_pck(out['queries'][n, assigned[j], i], gt, valid, bbox, alphas)
        rec['pck_pairs'][n, bucket] += 1
  return rec


def summarize(records, config) -> dict:
  """Split-level metrics from the concatenated pair records."""
  alphas = config.eval.alphas
  pck, pairs = records['pck'].sum(0), records['pck_pairs'].sum(0)  # [2, buckets, A], [buckets]
  metrics = {'num_pairs': int((records['pck_pairs'].sum(1) > 0).sum()),
             'num_instance_pairs': int(pairs.sum())}
  for a, alpha in enumerate(alphas):
    metrics[f'pck@{alpha:g}'] = float(pck[1, :, a].sum() / max(pairs.sum(), 1))
    metrics[f'pck_oracle@{alpha:g}'] = float(pck[0, :, a].sum() / max(pairs.sum(), 1))
  metrics['by_instances'] = {
      bucket: {f'pck@{alpha:g}': float(pck[1, k, a] / pairs[k]) for a, alpha in enumerate(alphas)} |
              {f'pck_oracle@{alpha:g}': float(pck[0, k, a] / pairs[k]) for a, alpha in enumerate(alphas)} |
              {'num_instance_pairs': int(pairs[k])}
      for k, bucket in enumerate(BUCKETS) if pairs[k] > 0}
  truths = records['truths'].sum()
  if truths:
    metrics['matched_iou'] = float(records['iou_sum'].sum() / truths)
    metrics['coseg_jaccard'] = float(records['jaccard_sum'].sum() / records['images'].sum())
    scores, tp = records['scores'].reshape(-1), records['tp'].reshape(-1)
    kept = scores >= 0
    metrics['ap50_all_point'] = average_precision(scores[kept], tp[kept], int(truths))
    metrics['ap50_coco'] = average_precision(scores[kept], tp[kept], int(truths), recall_points=101)
  return metrics


class Evaluator:
  """Runs `eval_step` over one split on the mesh; `evaluate(state)` -> (metrics, this process's first
  batch and its outputs)."""

  PER_SIDE = ('masks', 'objectness', 'detection_scores')  # [2, B, ...]: pairs on the second axis

  def __init__(self, config, model_module, split: str, category_names, mesh):
    del model_module, category_names  # the dual-path model; per-category tables are pck.py's
    self.config, self.split, self.mesh = config, split, mesh

    def step(state, batch):  # outputs split by pair, as the batch is
      out = eval_step(state, batch, config=config)
      return {k: jax.lax.with_sharding_constraint(v, NamedSharding(mesh, self._spec(k)))
              for k, v in out.items()}
    self._step = jax.jit(step)

  def _spec(self, key):
    return P(None, sharding.DATA_AXES) if key in self.PER_SIDE else P(sharding.DATA_AXES)

  def evaluate(self, state):
    records, first = [], None
    for local in input_pipeline.eval_iterator(self.config, self.split):
      with jax.set_mesh(self.mesh):  # a model may split its volume over the mesh
        out = self._step(state, sharding.global_batch(self.mesh, local))
      out = {k: sharding.local_part(self.mesh, v, self._spec(k)) for k, v in out.items()}
      records.append(pair_records(local, out, self.config))
      if first is None:
        first = {'batch': local, 'prediction': out}
    records = {k: np.concatenate([r[k] for r in records]) for k in records[0]}
    if jax.process_count() > 1:  # every process evaluated its share of the split
      records = {k: np.asarray(multihost_utils.process_allgather(v)).reshape((-1,) + v.shape[1:])
                 for k, v in records.items()}
    return summarize(records, self.config), first

  def plot(self, first, path: str) -> None:
    save_instances(first, path, alpha=self.config.eval.plot_alpha,
                   threshold=self.config.eval.objectness_threshold)


def save_instances(first, path: str, alpha: float = 0.1, threshold: float = 0.5) -> None:
  """One multi-instance pair: predicted instance masks on both images, and source instance 0's keypoints
  transferred into every predicted target instance (green: within alpha x box size of the truth of the
  true instance it was matched to; red: not)."""
  batch, out = first['batch'], first['prediction']
  counts = batch['target']['instance_valid'].sum(1) * batch['valid']
  n = int(np.argmax(counts))
  fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
  colours = plt.get_cmap('tab10')
  for s, (ax, name) in enumerate(zip(axes, ('source', 'target'))):
    ax.imshow(batch[name]['image'][n])
    if 'masks' in out:
      for q in np.flatnonzero(out['objectness'][s, n] > threshold):
        mask = out['masks'][s, n, q]
        overlay = np.zeros(mask.shape + (4,))
        overlay[mask] = (*colours(q % 10)[:3], 0.45)
        ax.imshow(overlay)
        if mask.any():
          ax.contour(mask, levels=[0.5], colors=[colours(q % 10)], linewidths=1.2)
    ax.set_title(f'{name}: predicted instances', fontsize=9)
    ax.set_axis_off()
  src = batch['source']
  valid = src['keypoint_valid'][n, 0]
  axes[0].scatter(*src['keypoints'][n, 0][valid].T, c='white', s=12, edgecolors='black')
  trg = batch['target']
  for j in np.flatnonzero(trg['instance_valid'][n]):
    both = valid & trg['keypoint_valid'][n, j]
    if 'masks' in out:  # into the predicted instance that overlaps true instance j most
      overlap = [(out['masks'][1, n, q] & trg['masks'][n, j]).sum() if out['objectness'][1, n, q] >
                 threshold else -1 for q in range(out['masks'].shape[2])]
      pred = out['queries'][n, int(np.argmax(overlap)), 0]
    else:
      pred = out['queries'][n, 0, 0]
    box = trg['bboxes'][n, j]
    hit = np.hypot(*(pred - trg['keypoints'][n, j]).T) <= alpha * max(box[2] - box[0], box[3] - box[1])
    axes[1].scatter(*pred[both].T, c=np.where(hit[both], 'lime', 'red'), s=12, edgecolors='black')
  fig.suptitle(f'source instance 0 transferred into every target instance (PCK@{alpha:g})', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
