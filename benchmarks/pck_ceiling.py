r"""What a feature grid allows: the PCK of an oracle that knows the true target cell of every keypoint.

  python benchmarks/pck_ceiling.py [--dataset_config default] [--split validation] [--pairs 200] \
      [--image_size 128] [--cells 4,8,16] [--alphas 0.05,0.1,0.15] [--out benchmarks/results/pck_ceiling.json]

Generates synthetic_misc pairs directly (no tfds build), scales them to the network input, and predicts each
target keypoint at the centre of the cell holding it. The error is then at most half a cell diagonal, and
the PCK it reaches (bbox threshold: alpha x the longer side of the keypoint's own instance box) bounds any
model that only picks cells. Also prints the thresholds in input pixels, and the mask ceiling of the same
grids: the mean IoU over the instances of both images of the best masks a grid of cells can draw (each
cell's true share of the instance as its probability, upsampled as the dual path upsamples its logits).
"""

import argparse
import json

import numpy as np

from misc_jax.models import dual_path
from misc_jax.ops import grid as grids
from tfds_builders.synthetic_misc import synthetic_misc_dataset_builder as synthetic


def grid_mask_iou(masks, cell: int):
  """The IoU of each true mask [N, S, S] (bool) with the best mask a grid of `cell` px cells draws."""
  size, grid = masks.shape[-1], grids.resnet(cell)
  share = np.asarray(dual_path.grid_masks(masks, size // cell, grid))
  logits = np.log(np.clip(share, 1e-4, 1)) - np.log(np.clip(1 - share, 1e-4, 1))
  drawn = np.asarray(dual_path.upsample_masks(logits, size, grid)) > 0
  inter, union = (drawn & masks).sum((1, 2)), (drawn | masks).sum((1, 2))
  return inter / np.maximum(union, 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset_config', default='default')
  parser.add_argument('--split', default='validation')
  parser.add_argument('--pairs', type=int, default=200)
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--cells', default='4,8,16')
  parser.add_argument('--alphas', default='0.05,0.1,0.15')
  parser.add_argument('--out', default=None)
  args = parser.parse_args()
  config = next(c for c in synthetic.Builder.BUILDER_CONFIGS if c.name == args.dataset_config)
  cells = [int(c) for c in args.cells.split(',')]
  alphas = [float(a) for a in args.alphas.split(',')]

  scale = args.image_size / config.image_size
  sides, keypoints = [], []  # per keypoint: its instance's longer box side, its position (input pixels)
  masks = []  # every instance of both images, resized to the input as the input pipeline does (nearest)
  nearest = np.floor((np.arange(args.image_size) + 0.5) / scale).astype(int)
  for index in range(args.pairs):
    pair = synthetic.make_pair(config, args.split, index)
    masks += [m[:, nearest][:, :, nearest] for m in (pair['source']['masks'], pair['target']['masks'])]
    target = pair['target']
    for box, kps, visible in zip(target['bboxes'], target['keypoints'], target['keypoint_visible']):
      sides += [scale * max(box[2] - box[0], box[3] - box[1])] * int(visible.sum())
      keypoints.append(scale * kps[visible])
  sides, keypoints = np.array(sides), np.concatenate(keypoints)

  results = {'dataset': f'synthetic_misc/{config.name}', 'split': args.split, 'pairs': args.pairs,
             'keypoints': len(sides), 'image_size': args.image_size,
             'threshold_px@0.1': dict(zip(('p25', 'median', 'p75'),
                                          np.percentile(0.1 * sides, [25, 50, 75]).round(2).tolist())),
             'oracle_pck': {}}
  print(f"{results['dataset']} {args.split}, {args.pairs} pairs, {len(sides)} keypoints at "
        f"{args.image_size} px; PCK@0.1 threshold in px (p25 / median / p75): "
        + ' / '.join(f'{v:.2f}' for v in results['threshold_px@0.1'].values()))
  print('cell px | grid | ' + ' | '.join(f'oracle PCK@{a:g}' for a in alphas))
  for cell in cells:
    error = np.linalg.norm((np.floor(keypoints / cell) + 0.5) * cell - keypoints, axis=-1)
    pck = {f'{a:g}': float(np.mean(error <= a * sides)) for a in alphas}
    results['oracle_pck'][f'cell_{cell}px'] = pck
    print(f'{cell} | {args.image_size // cell} | ' + ' | '.join(f'{100 * v:.1f}%' for v in pck.values()))
  masks = np.concatenate(masks)
  results['mask_ceiling_miou'] = {}
  print(f'cell px | mIoU of the best grid masks ({len(masks)} instances, both images)')
  for cell in cells:
    results['mask_ceiling_miou'][f'cell_{cell}px'] = miou = float(grid_mask_iou(masks, cell).mean())
    print(f'{cell} | {100 * miou:.1f}%')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
