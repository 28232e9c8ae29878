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
  ax.set_title(title, fontsize=8)
  ax.set_axis_off()


def save_pairs(batch: dict, path: str, num_pairs: int = 4, category_names=None) -> None:
  """Writes a PNG with one row per pair (source | target) from a host batch.

  `batch` is a pipeline batch with leading dims [D, B] or [B]; padding examples are skipped.
  """
  flat = {side: {k: np.reshape(v, (-1,) + v.shape[2:]) if np.ndim(batch['valid']) == 2 else v
                 for k, v in batch[side].items()} for side in ('source', 'target')}
  valid = np.reshape(batch['valid'], -1)
  category = np.reshape(batch['category'], -1)
  rows = np.nonzero(valid)[0][:num_pairs]
  fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
  for r, b in enumerate(rows):
    name = category_names[category[b]] if category_names else str(category[b])
    for c, side in enumerate(('source', 'target')):
      example = {k: v[b] for k, v in flat[side].items()}
      n = int(example['instance_valid'].sum())
      _draw_side(axes[r, c], example, f'{side}: {name}, {n} instance{"s" * (n != 1)}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
