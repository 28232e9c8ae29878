"""The numerical core: 4D correlation, 4D convolutions, soft-argmax and keypoint transfer, PCK.

One layout everywhere (channels last, source before target):
  features      [B, H, W, C]
  4D volumes    [B, Ha, Wa, Hb, Wb]       (a = source, b = target), with channels [B, Ha, Wa, Hb, Wb, C]
  keypoints     [B, N, 2] as (x, y), with a validity mask [B, N] instead of padding values
The golden tests transpose the reference layouts ([B, C, Ha, Wa, Hb, Wb], keypoints [B, 2, N]) to this one.
Every op is jit-compatible and differentiable.
"""
