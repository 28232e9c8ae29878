"""4D correlation of feature maps: HSNet's clamped cosine correlation, CATs' variant, mutual NN filter."""

from typing import Sequence

import jax.numpy as jnp


def l2_normalize(x, eps: float, eps_inside_sqrt: bool = False):
  """Normalises the last axis. HSNet: x / (||x|| + eps); CATs (FeatureL2Norm): x / sqrt(||x||^2 + eps)."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / (jnp.sqrt(sq + eps) if eps_inside_sqrt else jnp.sqrt(sq) + eps)


def correlation(src, trg, *, clamp: bool = True, eps: float = 1e-5, eps_inside_sqrt: bool = False):
  """Cosine similarity of every source with every target position.

  src [B, Ha, Wa, C], trg [B, Hb, Wb, C] -> [B, Ha, Wa, Hb, Wb]. Defaults are HSNet's (eps outside the
  sqrt, clamp at 0); `clamp=False, eps=1e-6, eps_inside_sqrt=True` is CATs'.
  """
  src = l2_normalize(src, eps, eps_inside_sqrt)
  trg = l2_normalize(trg, eps, eps_inside_sqrt)
  # corr: [B, Ha, Wa, Hb, Wb]
  acc = jnp.promote_types(src.dtype, jnp.float32)  # bf16 inputs accumulate in float32
  corr = jnp.einsum('bijc,bklc->bijkl', src, trg, preferred_element_type=acc)
  return jnp.maximum(corr, 0) if clamp else corr


def multilayer_correlation(src_feats: Sequence, trg_feats: Sequence, stack_ids: Sequence[int]):
  """HSNet's multilayer_correlation: per-layer correlations stacked into three groups.

  `src_feats`, `trg_feats` are ordered shallow -> deep; `stack_ids` = (s0, s1, s2) are cumulative layer
  counts, deepest group first (HSNet: (3, 9, 13) for ResNet-50, (3, 26, 30) for ResNet-101). Returns
  [deep, middle, shallow] groups, each [B, Ha, Wa, Hb, Wb, layers] with layers ordered shallow -> deep.
  Layers below L - s2 are ignored, as in HSNet.
  """
  num = len(src_feats)
  bounds = [num - s for s in stack_ids]
  groups, end = [], num
  for start in bounds:
    corrs = [correlation(src_feats[i], trg_feats[i]) for i in range(start, end)]
    groups.append(jnp.stack(corrs, axis=-1))
    end = start
  return groups


def mutual_nn_filter(corr):
  """CATs' soft mutual nearest-neighbour filter of a [B, Ha, Wa, Hb, Wb] volume (no sign change).

  corr * (corr / max over target) * (corr / max over source), with zero maxima replaced by 1e-30.
  """
  b, ha, wa, hb, wb = corr.shape
  flat = corr.reshape(b, ha * wa, hb * wb)  # [B, Sa, Sb]
  max_trg = jnp.max(flat, axis=2, keepdims=True)
  max_src = jnp.max(flat, axis=1, keepdims=True)
  max_trg = jnp.where(max_trg == 0, 1e-30, max_trg)
  max_src = jnp.where(max_src == 0, 1e-30, max_src)
  return (flat * (flat / max_trg) * (flat / max_src)).reshape(corr.shape)


def as_volume(scores):
  """Scores [B, Ha*Wa, Hb, Wb] -> float32 [B, Ha, Wa, Hb, Wb] (the source grid is square)."""
  b, sa, hb, wb = scores.shape
  ha = round(sa**0.5)
  if ha * ha != sa:
    raise ValueError(f'scores {scores.shape}: the source grid must be square')
  return scores.reshape(b, ha, ha, hb, wb).astype(jnp.float32)
