"""PCK evaluator: transfer the source keypoints of every pair of a split and report PCK@alphas.

Protocol (REFERENCE.md section 4): keypoints of source instance 0, scored against the closest target
instance (see models/kbcnet.py); threshold alpha * max(w, h) of that instance's box (`bbox`, SPair-71k,
PF-WILLOW) or of the network input (`image`, PF-PASCAL, whose inputs are resized to a square). Per-image
PCK (the field's headline number) averages over pairs with a valid keypoint; per-keypoint PCK pools them.
Datasets with pair attributes (SPair-71k's viewpoint, scale, truncation, occlusion, mirror) also get
per-image PCK for each value of each attribute (values 0 to ATTRIBUTE_LEVELS - 1). `config.eval.
extra_thresholds` adds PCK under other thresholds, labelled `pck_<name>@a`: 'chm' is CHM's PF-WILLOW
rule (padding slots inflate the keypoint extent; ops/pck.py), so PF-WILLOW results can stand next to the
peers' published numbers as well as ours.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from misc_jax import input_pipeline
from misc_jax import kbc
from misc_jax import sharding
from misc_jax import visualize
from misc_jax.models import supervision
from misc_jax.ops import pck

ATTRIBUTE_LEVELS = 8  # SPair-71k's attributes take values 0..4


def predict(state, batch, *, model_module, config):
  """Predicted target keypoints [B, K, 2] of source instance 0, plus the targets they are scored on."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  apply = functools.partial(state.apply_fn, variables)
  src_kps, src_valid, trg_kps, valid, boxes = supervision.instance_targets(batch)
  size = config.input.image_size
  transfer = lambda scores, kps, kps_valid: model_module.predict_keypoints(
      scores, kps, kps_valid, size, **model_module.transfer_kwargs(config.model))
  source, target = batch['source']['image'], batch['target']['image']
  pred = transfer(apply(source, target), src_kps, src_valid)
  if config.kbc.eval:  # a second pass on crops around the keypoints (misc_jax/kbc.py)
    full = (batch['source']['image_full'], batch['target']['image_full'])
    pred = kbc.predict(apply, transfer, source, target, src_kps, src_valid,
                       pred if config.kbc.coarse_pass else None, config.kbc, full)
  _, best, _ = supervision.match_instances(pred, trg_kps, valid, size)
  take = lambda x: supervision.take_instance(x, best)
  return {'src': src_kps, 'pred': pred, 'gt': take(trg_kps), 'valid': take(valid),
          'bbox': take(boxes)}


def _threshold(name: str, out, size: int):
  """The per-pair PCK threshold [B] of one rule."""
  if name == 'bbox':
    return pck.bbox_threshold(out['bbox'])
  if name == 'image':
    return pck.image_threshold((size, size), out['pred'].shape[0])
  if name == 'chm':
    return pck.chm_padded_keypoint_threshold(out['gt'], out['valid'], size)
  raise ValueError(f'unknown PCK threshold {name!r}; expected bbox, image or chm')


def eval_step(state, batch, *, model_module, config, num_categories: int):
  """One global batch's PCK counts, summed over its pairs, and the per-pair predictions."""
  out = predict(state, batch, model_module=model_module, config=config)
  size = config.input.image_size
  score = lambda name: pck.pck(out['pred'], out['gt'], out['valid'], _threshold(name, out, size),
                               config.eval.alphas)
  res = score(config.eval.threshold)
  counted = (batch['valid'] & (res['count'] > 0)).astype(jnp.float32)  # [B]
  by_category = jax.nn.one_hot(batch['category'], num_categories) * counted[:, None]  # [B, C]
  sums = {
      'per_image': counted @ res['per_image'],  # [A]
      'correct': counted @ res['correct'],
      'keypoints': counted @ res['count'],
      'pairs': counted.sum(),
      'category_per_image': by_category.T @ res['per_image'],  # [C, A]
      'category_pairs': by_category.sum(0),
      'attributes': {},
      'extra': {name: counted @ score(name)['per_image'] for name in config.eval.get('extra_thresholds', ())},
  }
  for name, values in batch.get('attributes', {}).items():
    levels = jax.nn.one_hot(values, ATTRIBUTE_LEVELS) * counted[:, None]  # [B, L]
    sums['attributes'][name] = {'per_image': levels.T @ res['per_image'], 'pairs': levels.sum(0)}
  return sums, out


class Evaluator:
  """Runs `eval_step` over one split on the mesh; `evaluate(state)` -> (metrics, this process's first
  batch and its predictions)."""

  def __init__(self, config, model_module, split: str, category_names, mesh):
    self.config, self.split, self.category_names, self.mesh = config, split, list(category_names), mesh
    step = functools.partial(eval_step, model_module=model_module, config=config,
                             num_categories=len(self.category_names))
    self._step = jax.jit(step, out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))

  def evaluate(self, state):
    total, first = None, None
    for local in input_pipeline.eval_iterator(self.config, self.split):
      with jax.set_mesh(self.mesh):  # a model may split its volume over the mesh
        sums, out = self._step(state, sharding.global_batch(self.mesh, local))
      sums = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)  # replicated: every process has it
      total = sums if total is None else jax.tree.map(np.add, total, sums)
      if first is None:
        first = {'batch': local, 'prediction': sharding.local_part(self.mesh, out)}
    return self._metrics(total), first

  def plot(self, first, path: str) -> None:
    visualize.save_correspondences(first, path, alpha=self.config.eval.plot_alpha,
                                   threshold=self.config.eval.threshold)

  def _metrics(self, total):
    pairs = max(total['pairs'], 1)
    metrics = {'num_pairs': int(total['pairs']), 'num_keypoints': int(total['keypoints'])}
    for i, alpha in enumerate(self.config.eval.alphas):
      metrics[f'pck@{alpha:g}'] = float(total['per_image'][i] / pairs)
      metrics[f'pck_keypoint@{alpha:g}'] = float(total['correct'][i] / max(total['keypoints'], 1))
      for name, per_image in total['extra'].items():
        metrics[f'pck_{name}@{alpha:g}'] = float(per_image[i] / pairs)
    metrics['per_category'] = {
        name: {f'pck@{a:g}': float(total['category_per_image'][c, i] / n)
               for i, a in enumerate(self.config.eval.alphas)} | {'num_pairs': int(n)}
        for c, name in enumerate(self.category_names)
        if (n := total['category_pairs'][c]) > 0}
    if total['attributes']:
      metrics['per_attribute'] = {
          name: {str(level): {f'pck@{a:g}': float(sums['per_image'][level, i] / n)
                              for i, a in enumerate(self.config.eval.alphas)} | {'num_pairs': int(n)}
                 for level in range(ATTRIBUTE_LEVELS) if (n := sums['pairs'][level]) > 0}
          for name, sums in total['attributes'].items()}
    return metrics
