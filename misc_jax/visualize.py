"""Pictures a person looks at: pairs with masks and keypoints (colour = keypoint index = semantic part)."""

import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

_MARKERS = 'osD^vP*X'


def _draw_side(ax, side, title):
  """Draws one side of a single (unbatched) pipeline example: image, instance masks, keypoints."""
  ax.imshow(side['image'])
  colours = plt.get_cmap('tab10')
  for i in np.nonzero(side['instance_valid'])[0]:
    if side['has_masks']:
      overlay = np.zeros(side['masks'][i].shape + (4,))
      overlay[side['masks'][i]] = colours(i % 10)[:3] + (0.35,)
      ax.imshow(overlay)
    x1, y1, x2, y2 = side['bboxes'][i]
    ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1, ec=colours(i % 10)))
    k = np.nonzero(side['keypoint_valid'][i])[0]
    ax.scatter(side['keypoints'][i, k, 0], side['keypoints'][i, k, 1], c=k, cmap='tab20',
               vmin=0, vmax=19, s=22, marker=_MARKERS[i % len(_MARKERS)], edgecolors='white',
               linewidths=0.6)
  height, width = side['image'].shape[:2]
  ax.set_xlim(0, width)  # keypoints outside the image (e.g. after a crop) must not widen the view
  ax.set_ylim(height, 0)
  ax.set_title(title, fontsize=8)
  ax.set_axis_off()


def save_pairs(batch: dict, path: str, num_pairs: int = 4, category_names=None) -> None:
  """Writes a PNG with one row per pair (source | target) from a host batch.

  `batch` is a pipeline batch [B, ...]; padding examples are skipped.
  """
  category = batch['category']
  rows = np.nonzero(batch['valid'])[0][:num_pairs]
  fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
  for r, b in enumerate(rows):
    name = category_names[category[b]] if category_names else str(category[b])
    for c, side in enumerate(('source', 'target')):
      example = {k: v[b] for k, v in batch[side].items()}
      n = int(example['instance_valid'].sum())
      _draw_side(axes[r, c], example, f'{side}: {name}, {n} instance{"s" * (n != 1)}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save_correspondences(result: dict, path: str, num_pairs: int = 4, alpha: float = 0.1,
                         threshold: str = 'bbox') -> None:
  """Source | target rows with a line from each source keypoint to its predicted target keypoint: green
  when within alpha * threshold of the truth (ringed), red otherwise. `result` is an evaluator's first
  batch: {'batch': pipeline batch [B, ...], 'prediction': {'src', 'pred', 'gt', 'valid', 'bbox'}}."""
  batch, out = result['batch'], result['prediction']
  rows = np.nonzero(batch['valid'])[0][:num_pairs]
  fig, axes = plt.subplots(len(rows), 1, figsize=(6, 3 * len(rows)), squeeze=False)
  for ax, b in zip(axes[:, 0], rows):
    src, trg = batch['source']['image'][b], batch['target']['image'][b]
    ax.imshow(np.concatenate([src, trg], axis=1))
    width = src.shape[1]
    box = out['bbox'][b]
    scale = max(box[2] - box[0], box[3] - box[1]) if threshold == 'bbox' else max(trg.shape[:2])
    for k in np.nonzero(out['valid'][b])[0]:
      (sx, sy), (px, py), (gx, gy) = out['src'][b, k], out['pred'][b, k], out['gt'][b, k]
      hit = np.hypot(px - gx, py - gy) <= alpha * scale
      colour = 'lime' if hit else 'red'
      ax.plot([sx, px + width], [sy, py], color=colour, lw=0.8)
      ax.scatter([sx, px + width], [sy, py], c=colour, s=10)
      ax.scatter([gx + width], [gy], s=40, facecolors='none', edgecolors='white', linewidths=0.8)
    ax.set_title(f'PCK@{alpha:g}: green within {alpha:g} x {threshold} size of the truth (rings)',
                 fontsize=8)
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar a run wrote to its TensorBoard events: tag -> sorted [(step, value)]; where a resumed
  run wrote a step again, the last value wins."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  series = {}
  for tag in acc.Tags()['tensors']:
    events = acc.Tensors(tag)
    if events and events[0].tensor_proto.tensor_shape.dim:  # not a scalar: the predictions image
      continue
    last = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events}
    series[tag] = sorted(last.items())
  return series


def plot_learning_curve(workdir: str, path: str) -> None:
  """Training loss and validation PCK against step, read back from the run's TensorBoard events."""
  series = read_scalars(workdir)
  fig, (ax_loss, ax_pck) = plt.subplots(1, 2, figsize=(10, 3.6))
  for tag in sorted(t for t in series if t.startswith('train/') and t.endswith('loss')):
    ax_loss.plot(*zip(*series[tag]), label=tag[6:])
  ax_loss.set(xlabel='step', ylabel='training loss', yscale='log')
  if ax_loss.lines:
    ax_loss.legend()
  for tag in sorted(t for t in series if t.startswith('eval/pck@')):
    ax_pck.plot(*zip(*series[tag]), marker='o', label=tag[5:])
  ax_pck.set(xlabel='step', ylabel='validation PCK', ylim=(0, 1))
  if ax_pck.lines:
    ax_pck.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
