"""The MISC dual-path model: Hungarian matching, mask IoU, the multi-instance evaluator, training."""

import functools
import itertools

from configs import misc210k_dualpath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from misc_jax import input_pipeline
from misc_jax import sharding
from misc_jax import state as state_lib
from misc_jax import train
from misc_jax.evaluators import misc
from misc_jax.models import dual_path
from misc_jax.models import instance_matching
from misc_jax.models import kbcnet
from misc_jax.ops import grid as grids


def _brute_force_assignment(cost, valid):
  """The cheapest injective map from valid truths to queries, by trying every permutation."""
  cols = np.flatnonzero(valid)
  best = min(itertools.permutations(range(cost.shape[0]), len(cols)),
             key=lambda rows: cost[list(rows), cols].sum())
  return cost[list(best), cols].sum()


@pytest.mark.parametrize('seed', range(4))
def test_hungarian_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  cost = rng.random((3, 5, 4)).astype(np.float32)  # 3 pairs, 5 queries, 4 truths
  valid = rng.random((3, 4)) < 0.7
  valid[0] = False  # a pair with no truth
  match = np.asarray(jax.jit(instance_matching.hungarian)(cost, valid))
  for b in range(3):
    assert (match[b][~valid[b]] == -1).all()
    picked = match[b][valid[b]]
    assert len(set(picked)) == len(picked) and (picked >= 0).all()
    got = cost[b][picked, np.flatnonzero(valid[b])].sum()
    np.testing.assert_allclose(got, _brute_force_assignment(cost[b], valid[b]), rtol=1e-6)


def test_objectness_cost_hands_an_instance_to_the_confident_of_two_equal_masks():
  gt = jnp.zeros((1, 1, 4, 4)).at[0, 0, :2].set(1.)  # one instance: the top half
  logits = jnp.stack([jnp.where(gt[0, 0] > 0, 4., -4.)] * 2)[None]  # two queries, both exactly it
  objectness = jnp.array([[-2., 2.]])  # query 1 is the confident one
  valid = jnp.array([[True]])
  loss = jax.jit(instance_matching.mask_loss, static_argnums=4)
  _, by_masks = loss(logits, objectness, gt, valid, 0.)
  _, by_both = loss(logits, objectness, gt, valid, 1.)
  assert int(by_masks[0, 0]) == 0 and int(by_both[0, 0]) == 1  # a tie goes to the first query


def test_no_object_weight_scales_the_objectness_loss_of_unmatched_queries():
  gt = jnp.zeros((1, 1, 4, 4)).at[0, 0, :2].set(1.)
  logits = jnp.stack([jnp.where(gt[0, 0] > 0, 4., -4.), jnp.full((4, 4), -4.)])[None]  # query 0 is it
  objectness = jnp.array([[0.5, -1.]])
  valid = jnp.array([[True]])
  loss = jax.jit(instance_matching.mask_loss, static_argnums=(4, 5))
  bce_matched, bce_unmatched = -jax.nn.log_sigmoid(0.5), -jax.nn.log_sigmoid(1.)
  full, match = loss(logits, objectness, gt, valid, 0., 1.)
  light, _ = loss(logits, objectness, gt, valid, 0., 0.1)
  assert int(match[0, 0]) == 0
  expected = lambda w: (bce_matched + w * bce_unmatched) / (1 + w)
  np.testing.assert_allclose(full - light, expected(1.) - expected(0.1), rtol=1e-5)


def test_mask_iou_and_instance_matching_against_numpy():
  rng = np.random.default_rng(0)
  pred, gt = rng.random((3, 9, 7)) < 0.4, rng.random((2, 9, 7)) < 0.4
  iou = misc.mask_iou(pred, gt)
  for p, g in itertools.product(range(3), range(2)):
    inter, union = np.logical_and(pred[p], gt[g]).sum(), np.logical_or(pred[p], gt[g]).sum()
    assert iou[p, g] == pytest.approx(inter / union)
  best = max(itertools.permutations(range(3), 2), key=lambda rows: iou[list(rows), [0, 1]].sum())
  np.testing.assert_array_equal(misc.match_instances(iou), best)
  assert misc.mask_iou(pred[:0], gt).shape == (0, 2)


def test_matched_mask_iou_by_hand():
  """The MaskIoU head's target: each query's binary mask against the truth matched to it, 0 unmatched."""
  gt = np.zeros((1, 3, 4, 4), np.float32)
  gt[0, 0, :2] = 1.  # rows 0-1 (8 cells)
  gt[0, 1, :, :1] = 1.  # column 0 (4 cells)
  logits = np.full((1, 4, 4, 4), -5., np.float32)
  logits[0, 0, :1] = 5.  # row 0: half of truth 0 -> IoU 4 / 8
  logits[0, 1, :, :1] = 5.  # exactly truth 1 -> 1
  logits[0, 2, :, :1] = 5.  # a duplicate of truth 1, matched to nothing -> 0
  logits[0, 3, 2:] = 0.1  # matched to truth 2, which is not valid -> 0
  match = np.array([[0, 1, 3]])
  valid = np.array([[True, True, False]])
  iou = instance_matching.matched_mask_iou(logits, gt, match, valid)
  np.testing.assert_allclose(iou, [[0.5, 1., 0., 0.]], atol=1e-6)
  loss = lambda iou_logits: instance_matching.mask_iou_loss(jnp.array([iou_logits]), logits, gt, match, valid)
  assert loss([0., 5., -5., -5.]) < loss([0., -5., 5., -5.])  # the true mask ranks above its duplicate


def test_mask_iou_head_ranks_the_masks_without_changing_them():
  """The head's loss reaches its own parameters alone (a stop-gradient): the masks do not bend to it."""
  config = misc210k_dualpath.get_config('smoke')
  config.model.mask_iou_loss_weight = 1.0
  model = dual_path.from_config(config.model)
  source, target = jax.random.randint(jax.random.key(0), (2, 1, 32, 32, 3), 0, 255).astype(jnp.uint8)
  variables = jax.jit(model.init)(jax.random.key(1), source, target)
  match, valid = jnp.array([[0, 1]]), jnp.array([[True, True]])

  def loss(params):
    out = model.apply({**variables, 'params': params}, source, target)
    cells = out['mask_logits'].shape[-1]
    gt = jnp.zeros((1, 2, cells, cells)).at[0, 0, :cells // 2].set(1.).at[0, 1, cells // 2:].set(1.)
    return instance_matching.mask_iou_loss(out['mask_iou'][1], out['mask_logits'][1], gt, match, valid).sum()

  grads = jax.jit(jax.grad(loss))(variables['params'])
  head = {'mask_iou', 'mask_iou_hidden'}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    if head & {getattr(k, 'key', None) for k in path}:
      assert np.abs(g).max() > 0, path
    else:
      assert not np.any(g), path


def _rect(rows, cols, size=8):
  m = np.zeros((size, size), bool)
  m[rows[0]:rows[1], cols[0]:cols[1]] = True
  return m


def test_misc_evaluator_on_a_two_instance_pair():
  """One pair: one source instance, two target instances; every number below is worked out by hand."""
  kps = lambda *points: np.array(points, np.float32)
  side = lambda masks, keypoints, valid, boxes: {
      'masks': np.array(masks)[None], 'instance_valid': np.array([True] * len(masks))[None],
      'has_masks': np.array([True]), 'keypoints': np.array(keypoints)[None],
      'keypoint_valid': np.array(valid)[None], 'bboxes': np.array(boxes, np.float32)[None]}
  a, b = _rect((0, 4), (0, 4)), _rect((4, 8), (4, 8))  # the two target instances, 16 pixels each
  batch = {
      'valid': np.array([True]),
      'source': side([_rect((2, 6), (2, 6))], [kps([1, 1], [2, 2], [3, 3])], [[True, True, False]],
                     [[0, 0, 4, 4]]),
      'target': side([a, b], [kps([1, 1], [2, 2], [3, 3]), kps([5, 5], [6, 6], [7, 7])],
                     [[True, True, True], [True, True, False]], [[0, 0, 4, 4], [4, 4, 8, 8]]),
  }
  # Predictions: query 0 = instance b exactly; query 1 = instance a's left half (IoU 0.5); query 2 is below
  # the objectness threshold. The source: query 0 = its mask; query 1 a stray 4-pixel blob (IoU 0).
  masks = np.zeros((2, 1, 3, 8, 8), bool)
  masks[1, 0, 0], masks[1, 0, 1], masks[1, 0, 2] = b, _rect((0, 4), (0, 2)), a
  masks[0, 0, 0], masks[0, 0, 1] = batch['source']['masks'][0, 0], _rect((6, 8), (0, 2))
  objectness = np.array([[[0.9, 0.3, 0.1]], [[0.9, 0.8, 0.2]]])  # [side, pair, query]
  # Oracle transfer: into a (j = 0) exact; into b (j = 1) keypoint 0 exact, keypoint 1 off by 0.5 px.
  oracle = np.zeros((1, 2, 1, 3, 2), np.float32)
  oracle[0, 0, 0] = [[1, 1], [2, 2], [0, 0]]
  oracle[0, 1, 0] = [[5, 5], [6.5, 6], [0, 0]]
  # Predicted instances: query 0 (matched to b) exact; query 1 (matched to a) off by 0.3 and 0.7 px.
  queries = np.zeros((1, 3, 1, 3, 2), np.float32)
  queries[0, 0, 0] = [[5, 5], [6, 6], [0, 0]]
  queries[0, 1, 0] = [[1.3, 1], [2, 2.7], [0, 0]]
  out = {'masks': masks, 'objectness': objectness, 'oracle': oracle, 'queries': queries,
         'detection_scores': objectness.copy()}  # AP's ranking; below, one that differs
  config = misc210k_dualpath.get_config('smoke')
  config.eval.alphas = (0.05, 0.1, 0.15)  # thresholds: 0.2, 0.4, 0.6 px (boxes are 4 px wide)
  metrics = misc.summarize(misc.pair_records(batch, out, config), config)

  assert metrics['num_pairs'] == 1 and metrics['num_instance_pairs'] == 2
  # Oracle: pair (0, a) 2/2 at every alpha; pair (0, b) 1/2, 1/2, 2/2.
  assert metrics['pck_oracle@0.05'] == pytest.approx((1 + 0.5) / 2)
  assert metrics['pck_oracle@0.1'] == pytest.approx((1 + 0.5) / 2)
  assert metrics['pck_oracle@0.15'] == pytest.approx((1 + 1) / 2)
  # Predicted: (0, a) through query 1: 0/2, 1/2, 1/2; (0, b) through query 0: 2/2.
  assert metrics['pck@0.05'] == pytest.approx((0 + 1) / 2)
  assert metrics['pck@0.1'] == pytest.approx((0.5 + 1) / 2)
  assert metrics['pck@0.15'] == pytest.approx((0.5 + 1) / 2)
  assert metrics['by_instances']['2']['num_instance_pairs'] == 2 and '1' not in metrics['by_instances']
  # Masks: source IoU 1; target a 0.5, b 1 -> the instance-matched IoU over 3 truths. Co-segmentation
  # Jaccard: the source's kept mask is its truth (1); the target's kept masks cover b and half of a, 24 of
  # the 32 true pixels and nothing else (0.75).
  assert metrics['matched_iou'] == pytest.approx((1 + 0.5 + 1) / 3)
  assert metrics['coseg_jaccard'] == pytest.approx((1 + 0.75) / 2)
  # AP@0.5 over 3 truths ranks every non-empty query: 0.9 (TP), 0.9 (TP), 0.8 (TP at IoU 0.5), then the
  # source's stray blob (0.3) and target query 2 (0.2, on a, already claimed): precision 1 up to recall 1.
  assert metrics['ap50_all_point'] == metrics['ap50_coco'] == pytest.approx(1.0)
  # A threshold above 0.8 drops target query 1 from mIoU and PCK, not from AP (COCO ranks every detection).
  config.eval.objectness_threshold = 0.85
  strict = misc.summarize(misc.pair_records(batch, out, config), config)
  assert strict['matched_iou'] == pytest.approx((1 + 0 + 1) / 3)
  assert strict['coseg_jaccard'] == pytest.approx((1 + 0.5) / 2)
  assert strict['pck@0.1'] == pytest.approx((0 + 1) / 2)
  assert strict['ap50_all_point'] == pytest.approx(1.0)
  # AP ranks by the detection scores, not by objectness: the source's stray blob first puts one false
  # positive before the three true ones (precision 3/4 at every recall); mIoU and PCK do not move.
  out['detection_scores'][0, 0, 1] = 0.95
  config.eval.objectness_threshold = 0.5
  reranked = misc.summarize(misc.pair_records(batch, out, config), config)
  assert reranked['ap50_all_point'] == reranked['ap50_coco'] == pytest.approx(0.75)
  assert reranked['matched_iou'] == metrics['matched_iou'] and reranked['pck@0.1'] == metrics['pck@0.1']
  # A duplicate of b (target query 2) ranked 0.85, above the half of a (0.8): a false positive before the
  # last true one, AP 2/3 + 1/3 x 3/4. Matrix NMS decays it to 0.85 / e^2, below every true detection.
  out['detection_scores'][0, 0, 1] = 0.3
  out['masks'][1, 0, 2], out['detection_scores'][1, 0, 2] = b, 0.85
  config.eval.matrix_nms_sigma = 0.
  duplicate = misc.summarize(misc.pair_records(batch, out, config), config)
  assert duplicate['ap50_all_point'] == pytest.approx(2 / 3 + 1 / 4)
  # COCO's 101 recalls: 0-0.66 (67 of them) at precision 1, 0.67-1 (34) at 3/4.
  assert duplicate['ap50_coco'] == pytest.approx((67 + 34 * 0.75) / 101)
  config.eval.matrix_nms_sigma = 2.
  assert misc.summarize(misc.pair_records(batch, out, config), config)['ap50_all_point'] == pytest.approx(1.0)


def test_matrix_nms_by_hand():
  """Three 2 x 4 strips, each overlapping the next by half (IoU 1/3 between neighbours, 0 for the ends)."""
  a, b, c = _rect((0, 2), (0, 4)), _rect((0, 2), (2, 6)), _rect((0, 2), (4, 8))
  masks, scores = np.stack([c, a, b]), np.array([0.7, 0.9, 0.8])
  decayed = misc.matrix_nms(scores, masks, sigma=2.)
  # a ranks first; b loses exp(-2 / 9) to a; c overlaps b alone, by as much as b overlaps a, so b's decay
  # of c is compensated in full.
  np.testing.assert_allclose(decayed, [0.7, 0.9, 0.8 * np.exp(-2 / 9)])
  # An exact duplicate of a, ranked second, loses exp(-2); b and c then keep their scores as above.
  with_copy = misc.matrix_nms(np.array([0.9, 0.85, 0.8, 0.7]), np.stack([a, a, b, c]), sigma=2.)
  np.testing.assert_allclose(with_copy, [0.9, 0.85 * np.exp(-2), 0.8 * np.exp(-2 / 9), 0.7])
  np.testing.assert_array_equal(misc.matrix_nms(scores, masks, sigma=0.), scores)


def test_mask_score_is_the_mean_probability_inside_the_mask():
  logits = jnp.array([[[2., -1.], [0.5, -3.]], [[-1., -2.], [-3., -4.]]])  # a mask of 2 pixels; an empty one
  expected = (jax.nn.sigmoid(2.) + jax.nn.sigmoid(0.5)) / 2
  np.testing.assert_allclose(instance_matching.mask_scores(logits), [expected, 0.], rtol=1e-6)


def test_average_precision_by_hand():
  # Ranked: TP, FP, TP over 3 truths: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3;
  # the envelope gives 1 x 1/3 + 2/3 x 1/3.
  ap = misc.average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3)
  assert ap == pytest.approx(1 / 3 + 2 / 9)


def test_ap50_coco_is_pycocotools_segm_ap_at_iou_half():
  """Random blobs on 6 images (1-3 truths, 0-5 detections each): greedy matching per image and 101-point
  AP pooled over the images equal pycocotools' COCOeval (segm, IoU 0.5, one category, area 'all')."""
  from pycocotools import coco  # pylint: disable=g-import-not-at-top
  from pycocotools import cocoeval  # pylint: disable=g-import-not-at-top
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  size = 32

  def blob():  # a random rectangle with a few random pixels: IoUs without ties
    rows, cols = (tuple(sorted(rng.choice(size, 2, replace=False))) for _ in range(2))
    return _rect(rows, cols, size=size) | (rng.random((size, size)) < 0.02)

  def rle(m):
    encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return dict(encoded, counts=encoded['counts'].decode())

  images, truths, detections, all_scores, all_tp, num_truths = [], [], [], [], [], 0
  for image_id in range(6):
    gts = [blob() for _ in range(rng.integers(1, 4))]
    dets = [g ^ (rng.random((size, size)) < 0.03) if rng.random() < 0.7 else blob()
            for g in gts for _ in range(rng.integers(0, 3))][:5]
    scores = rng.random(len(dets))
    images.append({'id': image_id, 'width': size, 'height': size})
    truths += [{'id': len(truths) + k + 1, 'image_id': image_id, 'category_id': 1, 'iscrowd': 0,
                'segmentation': rle(g), 'area': float(g.sum()), 'bbox': list(mask_utils.toBbox(rle(g)))}
               for k, g in enumerate(gts)]
    detections += [{'image_id': image_id, 'category_id': 1, 'segmentation': rle(d), 'score': float(sc)}
                   for d, sc in zip(dets, scores)]
    if dets:
      all_scores.append(scores)
      all_tp.append(misc.greedy_true_positives(scores, misc.mask_iou(np.stack(dets), np.stack(gts))))
    num_truths += len(gts)
  ours = misc.average_precision(np.concatenate(all_scores), np.concatenate(all_tp), num_truths,
                                recall_points=101)
  ground = coco.COCO()
  ground.dataset = {'info': {}, 'images': images, 'annotations': truths,
                    'categories': [{'id': 1, 'name': 'thing'}]}
  ground.createIndex()
  evaluation = cocoeval.COCOeval(ground, ground.loadRes(detections), 'segm')
  evaluation.params.iouThrs = np.array([0.5])
  evaluation.params.maxDets = [100]
  evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ['all']
  evaluation.evaluate()
  evaluation.accumulate()
  theirs = evaluation.eval['precision'][0, :, 0, 0, 0]
  assert 0.2 < ours < 0.95  # a case with misses and false positives
  assert ours == pytest.approx(float(theirs.mean()), abs=1e-9)
  assert misc.average_precision(np.concatenate(all_scores), np.concatenate(all_tp), num_truths) != ours


def test_training_steps_reduce_both_losses_then_the_evaluator_runs(smoke_config, tmp_path):
  config = misc210k_dualpath.get_config('smoke')
  config.dataset.data_dir = smoke_config.dataset.data_dir
  config.total_steps = 20
  config.optim.warmup_steps = 1
  config.optim.lr = config.optim.backbone_lr = 3e-3
  config.input.augment.photometric = False
  config.model.mask_iou_loss_weight = 1.0  # with the MaskIoU head: its loss, and AP ranked by it
  mesh = sharding.make_mesh(config)
  batch = sharding.global_batch(mesh, next(input_pipeline.train_iterator(config, steps_per_batch=1)),
                               stacked=True)  # one step's batch, seen again and again
  model_module, model = state_lib.create_model(config)
  state = state_lib.initial_state(config, model, mesh)
  step = train.compile_step(config, model_module, mesh, jax.tree.map(lambda x: x.sharding, state))
  history = []
  for _ in range(config.total_steps):
    state, metrics, _ = step(state, batch, jax.random.key(0), sharding.flags(mesh, False))
    history.append({k: float(v[0]) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  assert last['mask_loss'] < 0.85 * first['mask_loss'], history
  assert last['transfer_loss'] < 0.8 * first['transfer_loss'], history
  assert last['mask_iou_loss'] < first['mask_iou_loss'], history

  evaluator = misc.Evaluator(config, model_module, 'validation', None, mesh)
  metrics, first_batch = evaluator.evaluate(state)
  assert metrics['num_pairs'] == 3  # synthetic_misc/tiny validation
  for key in ('pck@0.1', 'pck_oracle@0.1', 'matched_iou', 'coseg_jaccard', 'ap50_all_point', 'ap50_coco'):
    assert 0 <= metrics[key] <= 1, (key, metrics)
  evaluator.plot(first_batch, str(tmp_path / 'pair.png'))
  assert (tmp_path / 'pair.png').stat().st_size > 10_000


@pytest.mark.parametrize('switch', ['coseg', 'mask_volume', 'corr_to_mask', 'mask_stride',
                                    'mask_iou_loss_weight', 'query_self_attention'])
def test_each_ablation_switch_changes_the_model(switch):
  config = misc210k_dualpath.get_config('smoke')
  image = jnp.zeros((1, 32, 32, 3), jnp.uint8)
  model = dual_path.from_config(config.model)
  # The default's other setting (mask_stride: the feature grid, without the pixel stem).
  other = {'mask_stride': 0, 'mask_iou_loss_weight': float(not config.model.mask_iou_loss_weight)}
  config.model[switch] = other.get(switch, not config.model[switch])
  ablated = dual_path.from_config(config.model)
  count = lambda m: sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(m.init, jax.random.key(0), image, image)['params']))
  if switch == 'mask_volume':  # same parameters, different wiring: the scores differ
    params = jax.jit(model.init)(jax.random.key(0), image, image)
    source, target = image + 100, image.at[:, 8:24, 8:24].set(200)
    full = jax.jit(model.apply)(params, source, target)['scores']
    assert not np.allclose(full, jax.jit(ablated.apply)(params, source, target)['scores'])
  elif config.model[switch]:  # a head or layers the default lacks
    assert count(ablated) > count(model)
  else:  # a path the default has
    assert count(ablated) < count(model)


def test_pixel_stem_cells_sit_on_the_mask_grid():
  """A pixel changed at the centre of mask cell (i, j) (grids.resnet(4): pixel 4i, 4j) changes that cell
  alone; one two pixels further changes its neighbour too. A stem off by a pixel fails both."""
  stem = dual_path.PixelStem(dim=8, stride=4)
  image = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  params = stem.init(jax.random.key(1), image)
  base = stem.apply(params, image)
  assert base.shape == (1, 8, 8, 8)
  changed = lambda y, x: np.abs(stem.apply(params, image.at[0, y, x].add(5.)) - base).max(-1)[0] > 1e-5
  centre = grids.resnet(4).centres(8)
  assert np.all(np.flatnonzero(changed(12, 20)) == [3 * 8 + 5]) and centre[3] == 12.5
  assert sorted(zip(*np.nonzero(changed(12, 22)))) == [(3, 5), (3, 6)]


def test_fine_masks_average_onto_the_feature_grid_where_the_transfer_is_restricted():
  """A mask linear in x, drawn on the stride-4 mask grid and averaged onto the stride-8 feature grid, is
  the same map as drawn on the feature grid directly (interior cells): the two grids are lined up."""
  config = misc210k_dualpath.get_config('smoke')
  config.model.mask_stride = 4
  size = config.input.image_size
  ramp = jnp.broadcast_to((jnp.arange(size) + 0.5) / size, (1, size, size))
  cells = -(-size // int(kbcnet.feature_grid(config.model).stride))
  fine = dual_path.grid_masks(ramp, -(-size // 4), dual_path.mask_grid(config.model))
  regions = dual_path.feature_grid_regions(fine, config.model, cells)
  direct = dual_path.grid_masks(ramp, cells, kbcnet.feature_grid(config.model))
  assert fine.shape[-1] == 2 * cells and regions.shape == direct.shape
  np.testing.assert_allclose(regions[0, 1:-1, 1:-1], direct[0, 1:-1, 1:-1], atol=1e-4)


def test_misc_evaluator_reads_kbcnet_through_the_whole_image(smoke_config):
  """A KBCNet run on the multi-instance evaluator (docs/misc.md compares the two on the same pairs): its
  one region is the whole target image, so each source instance's keypoints go where KBCNet's own
  transfer sends them, and no masks are scored."""
  config = smoke_config.copy_and_resolve_references()
  config.eval.evaluator = 'misc'
  config.input.augment.photometric = False
  batch = jax.tree.map(lambda x: x[:1], next(input_pipeline.train_iterator(config)))  # one pair
  _, model = state_lib.create_model(config)
  state = state_lib.initial_state(config, model)
  out = misc.eval_step(state, batch, config=config)
  assert set(out) == {'oracle', 'queries'}
  scores = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['source']['image'], batch['target']['image'])
  src_kps, src_valid, _, _ = dual_path.instance_pair_targets(batch)
  b, i, k, _ = src_kps.shape
  expected = kbcnet.predict_keypoints(scores, src_kps.reshape(b, i * k, 2), src_valid.reshape(b, i * k),
                                      config.input.image_size, **dual_path.transfer_kwargs(config.model))
  np.testing.assert_allclose(out['queries'][:, 0], expected.reshape(b, i, k, 2), atol=1e-3)


def test_without_coseg_the_loss_is_kbcnets_with_the_part_term_once(smoke_config):
  config = misc210k_dualpath.get_config('smoke')
  config.dataset.data_dir = smoke_config.dataset.data_dir
  config.model.coseg = False
  config.model.num_parts = 5 * config.input.max_keypoints
  config.input.augment.photometric = False
  batch = jax.tree.map(lambda x: x[:1], next(input_pipeline.train_iterator(config)))  # one pair

  def loss_and_terms(part_weight):
    config.model.part_loss_weight = part_weight
    _, model = state_lib.create_model(config)  # with a part head only when the weight is > 0
    image = batch['source']['image']
    variables = model.init(jax.random.key(0), image, image)
    apply = functools.partial(model.apply, variables)
    return dual_path.train_loss(apply, batch, config)

  with_parts, terms = loss_and_terms(1.0)
  without, _ = loss_and_terms(0.0)  # the model has no part head then: the same other parameters
  assert terms['part_loss'] > 0
  np.testing.assert_allclose(with_parts - without, terms['part_loss'], rtol=1e-5)


def test_transfer_on_true_masks_frees_the_transfer_terms_from_the_predicted_masks(smoke_config):
  config = misc210k_dualpath.get_config('smoke')
  config.dataset.data_dir = smoke_config.dataset.data_dir
  config.model.mask_volume = False  # so that the scores do not depend on the masks either
  config.input.augment.photometric = False
  batch = jax.tree.map(lambda x: x[:1], next(input_pipeline.train_iterator(config)))  # one pair
  _, model = state_lib.create_model(config)
  image = batch['source']['image']
  variables = model.init(jax.random.key(0), image, image)
  other = jax.tree.map(lambda x: x, variables)
  other['params']['mask_embed']['kernel'] = -variables['params']['mask_embed']['kernel']  # other masks

  def terms(transfer_on):  # the transfer terms and the mask loss, jitted (the Hungarian step needs it)
    config.model.transfer_on = transfer_on  # read when traced
    step = jax.jit(lambda v: dual_path.train_loss(functools.partial(model.apply, v), batch, config)[1])
    return [(np.array([p['transfer_loss'], p['match_loss']]), p['mask_loss'])
            for p in map(step, (variables, other))]

  (true_a, mask_a), (true_b, mask_b) = terms('true')
  np.testing.assert_allclose(true_a, true_b, rtol=1e-6)
  assert not np.isclose(mask_a, mask_b)
  (pred_a, _), (pred_b, _) = terms('predicted')
  assert not np.allclose(pred_a, pred_b, rtol=1e-4)
  config.model.transfer_on = 'gt'
  with pytest.raises(ValueError, match='transfer_on'):
    dual_path.train_loss(functools.partial(model.apply, variables), batch, config)


def test_the_training_transfer_is_the_whole_region_soft_argmax_whatever_the_prediction_rule(smoke_config):
  """As KBCNet's loss: model.transfer (the prediction rule) does not change the dual path's transfer terms,
  while it does change what the model predicts."""
  config = misc210k_dualpath.get_config('smoke')
  config.dataset.data_dir = smoke_config.dataset.data_dir
  batch = jax.tree.map(lambda x: x[:1], next(input_pipeline.train_iterator(config)))  # one pair
  cells = config.input.image_size // config.model.feature_stride
  scores = jax.random.normal(jax.random.key(0), (1, cells * cells, cells, cells))
  regions = jnp.ones((1, batch['target']['masks'].shape[1], cells, cells))  # every instance: the whole image
  losses, predictions = [], []
  for rule in ('soft_argmax', 'kernel_soft_argmax'):
    config.model.transfer = rule
    losses.append(dual_path.pair_losses(scores, regions, batch, config.input.image_size, config.model))
    predictions.append(dual_path.transfer_into(scores, regions, batch['source']['keypoints'],
                                               batch['source']['keypoint_valid'], config.input.image_size,
                                               config.model))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  assert not np.allclose(predictions[0], predictions[1], atol=1e-3)
