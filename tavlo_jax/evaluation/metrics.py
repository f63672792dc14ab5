"""Per-frame localization metrics: pure, vectorised jnp on [..., H, W] maps.

Every function works on any leading batch shape (usually [N, H, W]) and is
jit-able; the definitions follow the peers' evaluators (stated per function) and each
convention that moves published numbers is a named argument. The dataset
aggregates (means, AUC, TN%, AP...) live in `aggregates.py` and run on the
host in float64; `reference.py` restates everything here as plain per-frame
float64 numpy loops for the tests.

Conventions (all recorded in the results JSON by the evaluator):
- Normalisation is min-max per frame; a FLAT map (max == min) is returned
  unchanged rather than divided by zero, so it never produces NaN. Hence a
  non-flat normalised map always has a pixel at exactly 1.
- cIoU with an empty denominator (no GT and nothing predicted) is 0, not NaN.
- Ties: top-50% keeps `>=` or `>` the median element (both variants exist in
  the peers' code); adaptive top-k keeps exactly k pixels, breaking ties by
  the lower flat index; the pointing game takes the FIRST argmax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# 'bicubic_torch': torch's F.interpolate(mode='bicubic', align_corners=True),
# with which LVS, EZ-VSL, SLAVC and FNAC upsample their maps to 224x224.
INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'bicubic_torch')
TORCH_CUBIC_A = -0.75


def _flat(x):
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _sum_hw(x):
  return x.sum(axis=(-2, -1))


# ---- maps -------------------------------------------------------------------

# Relative spread below which a map counts as flat (16 float32 ulps).
FLAT_RTOL = 16 * float(np.finfo(np.float32).eps)


def normalize(s):
  """Min-max to [0, 1] per map; a flat map stays flat (no NaN).

  "Flat" includes a spread of float32 rounding only (at most FLAT_RTOL of the
  map's magnitude): upsampling a constant map is a weighted sum whose weights
  add up to 1 only within rounding, and on some CPUs the result wobbles by an
  ulp, which min-max would blow up to a full [0, 1] map. Such a map becomes
  its max everywhere (a truly flat map is unchanged).
  """
  s = jnp.asarray(s, jnp.float32)
  lo = s.min(axis=(-2, -1), keepdims=True)
  hi = s.max(axis=(-2, -1), keepdims=True)
  span = hi - lo
  flat = span <= FLAT_RTOL * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  p = (s - lo) / jnp.where(flat, 1.0, span)
  # XLA's vectorised division can land 1 ulp below 1 at the maximum; pin it,
  # so "a non-flat map always has a pixel at 1" holds exactly.
  return jnp.where(flat, hi, jnp.where(s == hi, 1.0, p))


def _torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bicubic resize with align_corners=True:
  output i samples input i (n_in - 1) / (n_out - 1) with the Keys kernel
  (a = -0.75) over its 4 neighbours, indices clamped at the borders."""
  a = TORCH_CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1             # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a       # 1 < |x| < 2
  w = np.zeros((n_out, n_in), np.float64)
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  for i in range(n_out):
    real = i * scale
    k = int(np.floor(real))
    t = real - k
    for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      w[i, min(max(k + offset, 0), n_in - 1)] += weight
  return w


def _resize_matrix(n_in: int, n_out: int, interpolation: str):
  """[n_out, n_in] weights of jax.image.resize along one axis (resize is linear)."""
  if interpolation == 'bicubic_torch':
    return jnp.asarray(_torch_bicubic_matrix(n_in, n_out), jnp.float32)
  return jax.image.resize(jnp.eye(n_in, dtype=jnp.float32), (n_out, n_in), interpolation,
                          antialias=False)


def upsample(s, size: Sequence[int], interpolation: str = 'bilinear'):
  """Resizes maps [..., h, w] to size=(H, W) with `jax.image.resize` semantics.

  Half-pixel centres and no antialiasing, i.e. torch's
  `F.interpolate(..., align_corners=False)` for bilinear/nearest-on-upsample.
  'bicubic' is jax's Keys kernel (a=-0.5), not torch's a=-0.75;
  'bicubic_torch' is torch's bicubic with align_corners=True (the peers').
  The per-axis weight matrices come from jax.image.resize itself and are
  applied as one einsum: the same numbers (up to float rounding) ~10x faster
  on CPU than resizing the batch directly.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation {interpolation!r}: expected one of {INTERPOLATIONS}')
  return _resize(s, size, interpolation)


def _resize(s, size, method):
  s = jnp.asarray(s, jnp.float32)
  (h, w), (out_h, out_w) = s.shape[-2:], tuple(int(v) for v in size)
  if (h, w) == (out_h, out_w):
    return s
  wy = _resize_matrix(h, out_h, method)
  wx = _resize_matrix(w, out_w, method)
  return jnp.einsum('yi,...ij,xj->...yx', wy, s, wx, precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=None)
def _linear_runs(n_in: int, n_out: int, interpolation: str):
  """A bilinear (or nearest) resize along one axis, from its weights:
  out[i] = in[j0[i]] (1 - frac[i]) + in[j1[i]] frac[i], and `runs`, the
  lengths of the runs of outputs that share j0 (back to back from 0). Within
  a run the output is constant, then linear in i: its extremes are at the
  run's ends."""
  with jax.ensure_compile_time_eval():     # concrete weights, also under jit
    w = np.asarray(_resize_matrix(n_in, n_out, interpolation), np.float64)
  j0 = np.argmax(w != 0, axis=1)
  j1 = np.minimum(j0 + 1, n_in - 1)
  frac = np.where(j1 != j0, w[np.arange(n_out), j1], 0.0).astype(np.float32)
  runs = np.diff(np.flatnonzero(np.concatenate([[1], np.diff(j0), [1]])))
  return j0, j1, frac, runs


def _is_linear_upsample(interpolation: str, size_in, size_out) -> bool:
  """Each output pixel mixes at most its two nearest inputs along each axis."""
  return (interpolation in ('bilinear', 'nearest')
          and all(o >= i for i, o in zip(size_in, size_out)))


def _run_ends(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
  """The first and last output index of every run (see `_linear_runs`)."""
  runs = _linear_runs(n_in, n_out, interpolation)[3]
  starts = np.concatenate([[0], np.cumsum(runs)[:-1]])
  return np.unique(np.concatenate([starts, starts + runs - 1]))


def upsampled_range(s, size: Sequence[int], interpolation: str = 'bilinear'):
  """(min, max) of upsample(s, size, interpolation) per map, [...] each.

  For 'bilinear' and 'nearest' the upsampled map is bilinear (or constant)
  on each rectangle of runs (`_linear_runs`), so its extremes lie at the
  rectangles' corner pixels: the map is computed on those rows and columns
  only (a few hundred pixels instead of H x W). Values agree with the full
  map's up to float rounding. Other interpolations compute the full map.
  """
  s = jnp.asarray(s, jnp.float32)
  (h, w), (out_h, out_w) = s.shape[-2:], tuple(int(v) for v in size)
  if not _is_linear_upsample(interpolation, (h, w), (out_h, out_w)):
    up = upsample(s, size, interpolation)
    return up.min(axis=(-2, -1)), up.max(axis=(-2, -1))
  wy = _resize_matrix(h, out_h, interpolation)[_run_ends(h, out_h, interpolation)]
  wx = _resize_matrix(w, out_w, interpolation)[_run_ends(w, out_w, interpolation)]
  corners = jnp.einsum('yi,...ij,xj->...yx', wy, s, wx, precision=jax.lax.Precision.HIGHEST)
  return corners.min(axis=(-2, -1)), corners.max(axis=(-2, -1))


# Below this many pixels per block the broadcast form is no faster than the dot.
_MIN_BLOCK = 8


def upsample_fused(s, size: Sequence[int], interpolation: str = 'bilinear'):
  """`upsample`, written so that XLA can fuse it into its consumers.

  Along the width a bilinear (or nearest) upsample reads two input columns
  per output pixel, the same two for runs of pixels (`_linear_runs`); when
  the runs share a block length of at least _MIN_BLOCK (e.g. 40 pixels for
  8 -> 640), the map is a broadcast of per-block values times fixed
  fractions, an element-wise expression that a consumer computes on the fly
  instead of reading a materialised H x W map. The same values as
  `upsample` to float rounding; other cases are `upsample` itself.
  """
  s = jnp.asarray(s, jnp.float32)
  (h, w), (out_h, out_w) = s.shape[-2:], tuple(int(v) for v in size)
  if not _is_linear_upsample(interpolation, (h, w), (out_h, out_w)):
    return upsample(s, size, interpolation)
  j0, j1, frac, runs = _linear_runs(w, out_w, interpolation)
  block = int(np.gcd.reduce(runs))
  if block < _MIN_BLOCK:
    return upsample(s, size, interpolation)
  rows = jnp.einsum('yi,...ij->...yj', _resize_matrix(h, out_h, interpolation), s,
                    precision=jax.lax.Precision.HIGHEST)
  frac = frac.reshape(-1, block)
  up = (rows[..., j0[::block], None] * (1.0 - frac)
        + rows[..., j1[::block], None] * frac)
  return up.reshape(rows.shape[:-1] + (out_w,))


# ---- binarisation ------------------------------------------------------------

def avatar_fixed(p, threshold: float):
  """AVATAR: p > threshold on the min-max-normalised map p."""
  return p > threshold


def _order_key(x):
  """float32 -> int32 with the same order (negatives' magnitude bits flipped)."""
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_order_key(key):
  return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def kth_smallest(flat, rank):
  """flat[..., n], rank[...] (0-based) -> the element at `rank` of the ascending sort.

  Exact selection by bisection on the float's bit pattern: 32 counting
  passes, no sort. XLA's CPU sort of a 640x360 map is ~100x slower than a
  pass, and a GPU does the passes at memory speed too. Each pass counts
  the values above the candidate with `_step` and sums rows first (the
  forms XLA:CPU vectorises; a compare-and-sum pass is several times slower).
  -0.0 and +0.0 count as equal, as floats compare.
  """
  flat = jnp.asarray(flat, jnp.float32)
  n = flat.shape[-1]
  width = max(d for d in range(1, min(n, 1024) + 1) if n % d == 0)
  rows = flat.reshape(flat.shape[:-1] + (n // width, width))
  keys = _order_key(flat)
  target = jnp.asarray(rank, jnp.float32)[..., None] + 1
  lo, hi = keys.min(axis=-1, keepdims=True), keys.max(axis=-1, keepdims=True)

  def step(_, bounds):
    lo, hi = bounds
    mid = (lo & hi) + ((lo ^ hi) >> 1)        # floor((lo + hi) / 2) without overflow
    above = _step(rows - _from_order_key(mid)[..., None]).sum(-1).sum(-1, keepdims=True)
    enough = n - above >= target               # counts < 2**24: exact in float32
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return _from_order_key(lo[..., 0])


def top50_threshold(p):
  """Element N//2 of the ascending sort of each map (the classic protocol)."""
  flat = _flat(p)
  return kth_smallest(flat, jnp.full(flat.shape[:-1], flat.shape[-1] // 2))


def top50(p, strict: bool):
  """Classic top-50%: p >= thr (EZ-VSL, FNAC, SLAVC) or p > thr (LVS, SSL-TIE)."""
  thr = top50_threshold(p)[..., None, None]
  return p > thr if strict else p >= thr


def adaptive_topk(p, k):
  """Exactly k[...] pixels with the highest values (ties: lower flat index first).

  k is the number of GT pixels of each frame (SSL-Align's oracle-size rule);
  k = 0 predicts nothing.
  """
  flat = _flat(p)
  n = flat.shape[-1]
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), flat.shape[:-1])
  kth = kth_smallest(flat, jnp.clip(n - k, 0, n - 1))[..., None]
  greater = flat > kth
  equal = flat == kth
  # Of the pixels tied with the k-th value keep just enough, in index order.
  # The running count is a slow scan on CPU; skip it when no frame has more
  # tied pixels than room for them.
  room = k[..., None] - greater.sum(axis=-1, keepdims=True)
  tied = jax.lax.cond(
      (equal.sum(axis=-1, keepdims=True) > room).any(),
      lambda: equal & (jnp.cumsum(equal, axis=-1, dtype=jnp.int32) <= room),
      lambda: equal)
  keep = (greater | tied) & (k[..., None] > 0)
  return keep.reshape(p.shape)


def raw_threshold(s, threshold: float):
  """Absolute rule on the raw (not normalised) score: s >= threshold."""
  return s >= threshold


# ---- ground truth ------------------------------------------------------------

def mask_union(masks, valid=None):
  """[..., I, H, W] instance masks (optionally valid[..., I]) -> 0/1 float map."""
  m = jnp.asarray(masks) > 0
  if valid is not None:
    m = m & jnp.asarray(valid, bool)[..., None, None]
  return m.any(axis=-3).astype(jnp.float32)


def _rasterize_boxes(corners, valid, height: int, width: int):
  """Integer [x0, y0, x1, y1] boxes -> per-box coverage with half-open slices."""
  x0, y0, x1, y1 = (corners[..., i, None, None] for i in range(4))
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  return inside & jnp.asarray(valid, bool)[..., None, None]


def box_union(boxes, valid, height: int, width: int):
  """VGG-SS GT: boxes [..., I, 4] normalised [x0, y0, x1, y1] -> 0/1 map.

  As the peers do it: clip to [0, 1], scale to the map size, truncate to int,
  rasterise with half-open slices [y0:y1, x0:x1]. The scaling is float32.
  """
  scale = jnp.array([width, height, width, height], jnp.float32)
  corners = (jnp.clip(jnp.asarray(boxes, jnp.float32), 0, 1) * scale).astype(jnp.int32)
  return _rasterize_boxes(corners, valid, height, width).any(axis=-3).astype(jnp.float32)


def xywh_to_normalized_xyxy(boxes, height: int, width: int):
  """[x, y, w, h] in mask pixels (the eval batches) -> normalised [x0, y0, x1, y1]."""
  b = jnp.asarray(boxes, jnp.float32)
  x0, y0 = b[..., 0] / width, b[..., 1] / height
  return jnp.stack([x0, y0, x0 + b[..., 2] / width, y0 + b[..., 3] / height], axis=-1)


def consensus_map(boxes, valid, size: int = 224, source_size: int = 256):
  """Flickr-SoundNet GT: g = min(count / 2, 1) over all annotators' boxes.

  boxes [..., I, 4] are [x0, y0, x1, y1] in `source_size` pixels, scaled by
  int(size * v / source_size) as the peers do (then clipped to the map).
  """
  b = jnp.asarray(boxes, jnp.float32)
  corners = jnp.clip((size * b / source_size).astype(jnp.int32), 0, size)
  count = _rasterize_boxes(corners, valid, size, size).sum(axis=-3)
  return jnp.minimum(count / 2.0, 1.0).astype(jnp.float32)


def area_average(gt, grid: Sequence[int]):
  """[..., H, W] -> [..., h, w]: the mean of the pixels covering each grid cell
  (exact fractional overlaps when the grid does not divide the size)."""
  gt = jnp.asarray(gt, jnp.float32)
  (h, w), (gh, gw) = gt.shape[-2:], tuple(grid)
  if h % gh == 0 and w % gw == 0:
    # Whole cells: block sums of 0/1 (or 0.5-step) weights are exact in any
    # order, so the result does not depend on the batch shape.
    blocks = gt.reshape(gt.shape[:-2] + (gh, h // gh, gw, w // gw))
    return blocks.sum(axis=(-3, -1)) / ((h // gh) * (w // gw))
  return _resize(gt, grid, 'area')


def grid_oracle_map(gt, grid: Sequence[int], interpolation: str = 'bilinear'):
  """The best map a model with an (h, w) grid can emit: GT area-averaged to the grid.

  `area_average` (jax.image.resize's 'area' rule), then the map goes back up
  with the same interpolation the evaluator uses for model maps. Scoring this
  map gives the oracle ceiling of a grid size (see `oracle_ciou`).
  """
  gt = jnp.asarray(gt, jnp.float32)
  return upsample(area_average(gt, grid), gt.shape[-2:], interpolation)


# Thresholds tried on the normalised oracle map; 0 and 1 are excluded because
# p > 0 keeps every cell touching the object and p > 1 keeps nothing.
ORACLE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def oracle_ciou(gt, grid: Sequence[int], interpolation: str = 'bilinear'):
  """Oracle ceiling of a grid: per frame, the best cIoU over ORACLE_THRESHOLDS.

  Returns (best, adaptive): `best` = max over t of cIoU(norm(oracle) > t, gt),
  `adaptive` = cIoU of the adaptive top-k rule on the same oracle map.
  """
  p = normalize(grid_oracle_map(gt, grid, interpolation))
  best = ciou_above_thresholds(p, gt, ORACLE_THRESHOLDS).max(axis=-1)
  return best, ciou(adaptive_topk(p, gt_pixels(gt)), gt)


# ---- per-frame scores ------------------------------------------------------

def gt_pixels(gt):
  """Number of pixels with positive GT weight (the k of adaptive top-k)."""
  return _sum_hw((jnp.asarray(gt) > 0).astype(jnp.int32))


def ciou(pred, gt):
  """sum(P*g) / (sum(g) + sum(P*[g == 0])); 0 when the denominator is 0.

  Sums of 0/1 (or 0.5-multiples) stay exact in float32 up to 2**24 pixels,
  so the value does not depend on how the batch is sharded.
  """
  pred = jnp.asarray(pred).astype(jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  inter = _sum_hw(pred * gt)
  union = _sum_hw(gt) + _sum_hw(pred * (gt == 0))
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


# Up to this many thresholds are unrolled (XLA fuses their passes over the
# map); more (the oracle's 19) go one at a time through lax.map, which keeps
# memory at one map and the program small.
_UNROLLED_THRESHOLDS = 4


def _counts_above(p, gt, thresholds):
  """Per threshold t: (sum(g * [p > t]), #{p > t, g == 0}, #{p > t}) -> 3 x [..., T].

  All three are sums of 0/1 (or 0.5-multiple) values, exact in float32, so
  the unrolled and the lax.map forms give the same numbers.
  """
  gt = jnp.asarray(gt, jnp.float32)

  def counts(t):
    above = p > t
    return (jnp.where(above, gt, 0.0).sum(axis=(-2, -1)),
            (above & (gt == 0)).sum(axis=(-2, -1)).astype(jnp.float32),
            above.sum(axis=(-2, -1)).astype(jnp.float32))

  if len(thresholds) <= _UNROLLED_THRESHOLDS:
    out = [counts(jnp.float32(t)) for t in thresholds]
    return tuple(jnp.stack(x, axis=-1) for x in zip(*out))
  out = jax.lax.map(counts, jnp.asarray(thresholds, jnp.float32))
  return tuple(jnp.moveaxis(x, 0, -1) for x in out)


def scores_above_thresholds(p, gt, thresholds: Sequence[float]):
  """(cIoU, pIA) of the binarisation p > t for each t: two [..., T] arrays."""
  inter, background, above = _counts_above(p, gt, thresholds)
  union = _sum_hw(jnp.asarray(gt, jnp.float32))[..., None] + background
  ciou_t = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  return ciou_t, above / (p.shape[-2] * p.shape[-1])


# ---- fixed thresholds on the raw upsampled map (the AVATAR protocol's hot path)

# A 0/1 step without compare/select: XLA:CPU emits compare-and-select
# reductions as scalar loops (several times slower than arithmetic), while
# max/mul/min fuse into its vectorised reductions and dots. Any positive
# float32 difference of normal numbers times 2**126 is >= 1; inf is clipped.
_STEP_GAIN = 2.0**126


def _step(x):
  """1.0 where x > 0, else 0.0 (NaN stays NaN; callers mask non-finite maps)."""
  return jnp.minimum(jnp.maximum(x, 0.0) * _STEP_GAIN, 1.0)


def raw_thresholds(lo, hi, thresholds: Sequence[float]):
  """Per map, the raw value above which min-max-normalised p exceeds each t.

  p > t  <=>  s > lo + t (hi - lo) (exactly so in real numbers; float32 can
  move a pixel within rounding of the threshold, as computing p can). A
  FLAT map normalises to hi everywhere (see `normalize`), so its rule is
  hi > t: -inf (every pixel) or +inf (none). lo, hi: [...]; -> [..., T].
  """
  t = jnp.asarray(thresholds, jnp.float32)
  lo, hi = lo[..., None], hi[..., None]
  span = hi - lo
  flat = span <= FLAT_RTOL * jnp.maximum(jnp.abs(hi), jnp.abs(lo))
  return jnp.where(flat, jnp.where(hi > t, -jnp.inf, jnp.inf), lo + t * span)


def _row_dot(a, b):
  """sum over x of a[..., y, x] * b[..., y, x] -> [..., y], as a dot (one of
  XLA:CPU's fastest reductions), at float32 precision."""
  return jnp.einsum('...yx,...yx->...y', a, b, precision=jax.lax.Precision.HIGHEST)


def _counts_above_raw(up, thr, gt):
  """Per threshold t: (#{up > t}, sum(gt * [up > t])) -> two [..., T'], exact
  for a 0/1 gt (for any other gt the second is meaningless). T' = T rounded
  up to even: an odd T gets a last column for t = -inf (H * W, sum(gt)).

  Two thresholds share one pass: a pixel contributes [up > t0] + B [up > t1]
  (B a power of two above the row width); rows are summed (a plain sum and
  a dot with the GT: XLA:CPU's fastest reductions) and the two digits split
  per row, where the sums are still exact integers in float32.
  """
  width = up.shape[-1]
  base = float(2 ** int(np.ceil(np.log2(width + 1))))
  if width * (base + 1) >= 2**24:
    raise ValueError(f'maps {up.shape[-2:]}: rows wider than 4095 pixels are not supported')
  n = thr.shape[-1]
  if n % 2:
    thr = jnp.concatenate([thr, jnp.full(thr.shape[:-1] + (1,), -jnp.inf, thr.dtype)], -1)
  above, inter = [], []
  for i in range(0, n, 2):
    w = (_step(up - thr[..., i, None, None])
         + base * _step(up - thr[..., i + 1, None, None]))
    for rows, out in ((w.sum(-1), above), (_row_dot(w, gt), inter)):
      high = jnp.floor(rows / base)
      out += [(rows - base * high).sum(-1), high.sum(-1)]
  return jnp.stack(above, axis=-1), jnp.stack(inter, axis=-1)


def fixed_threshold_scores(up, gt, thresholds: Sequence[float], lo=None, hi=None,
                           weighted: bool = False):
  """(cIoU, pIA) of p > t for each t, from raw upsampled maps up [N, H, W]
  (p = normalize(up)) and the GT gt [N, H, W] (bool masks, or float): two
  [N, T] arrays.

  The numbers of `scores_above_thresholds(normalize(up), gt, ...)` up to
  pixels within float rounding of a threshold, in a few passes: the
  thresholds move to the raw map (`raw_thresholds`) and, for a 0/1 GT, the
  counts are packed two thresholds per pass (`_counts_above_raw`). A frame
  whose GT is not 0/1 then scores NaN rather than a wrong number; GT with
  weights in [0, 1] (Flickr's consensus) needs weighted=True (one pass per
  threshold). A map that is not finite predicts nothing. lo, hi [N]: the
  maps' min and max if the caller has them.
  """
  up = jnp.asarray(up, jnp.float32)
  gt = jnp.asarray(gt)
  is_mask = gt.dtype == jnp.bool_            # 0/1 by its type: nothing to check
  # One buffer for every pass over the GT (in a chunk loop XLA would
  # otherwise slice it once per consumer); a bool mask is 4x fewer bytes.
  gt = jax.lax.optimization_barrier(gt).astype(jnp.float32)
  lo = up.min(axis=(-2, -1)) if lo is None else lo
  hi = up.max(axis=(-2, -1)) if hi is None else hi
  thr = raw_thresholds(lo, hi, thresholds)
  # Sums go rows first, then over rows: XLA:CPU reduces rows several times
  # faster than whole maps.
  total = lambda x: x.sum(axis=-1).sum(axis=-1)
  n = len(thresholds)
  if weighted:
    gt_sum = total(gt)
    steps = [_step(up - thr[..., i, None, None]) for i in range(thr.shape[-1])]
    on_gt = _step(gt)
    above, inter, on_above = (jnp.stack([f(s) for s in steps], axis=-1) for f in
                              (total, lambda s: _row_dot(s, gt).sum(-1),
                               lambda s: _row_dot(s, on_gt).sum(-1)))
  else:
    above, inter = _counts_above_raw(up, thr, gt)
    # An odd number of thresholds leaves sum(gt) in the -inf column for free.
    gt_sum = inter[..., n] if n % 2 else total(gt)
    above, inter = above[..., :n], inter[..., :n]
    on_above = inter
  # A map with NaN or inf has no meaningful min-max; it predicts nothing.
  finite = (jnp.isfinite(lo) & jnp.isfinite(hi))[..., None]
  above, inter, on_above = (jnp.where(finite, x, 0.0) for x in (above, inter, on_above))
  union = gt_sum[..., None] + above - on_above
  ciou_t = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
  if not (weighted or is_mask):
    # g - g * g is 0 exactly for g in {0, 1} and positive for 0 < g < 1.
    binary = total(jnp.abs(gt - gt * gt)) == 0
    ciou_t = jnp.where(binary[..., None], ciou_t, jnp.nan)
  return ciou_t, above / (up.shape[-2] * up.shape[-1])


# Frames evaluated at once: 8 maps of 640x360 float32 (7 MB) stay close to
# the cache, a whole batch does not, and on a CPU these passes are bound by
# memory bandwidth (BENCHMARKS.md, "Evaluation metrics").
CHUNK_FRAMES = 8


def over_frame_chunks(fn, *arrays, chunk: int = CHUNK_FRAMES):
  """fn(*arrays) for per-frame fn on [N, ...] arrays, `chunk` frames at a
  time (lax.map; N padded with zeros to a multiple). Any pytree out."""
  n = arrays[0].shape[0]
  if n <= chunk:
    return fn(*arrays)
  padded = -(-n // chunk) * chunk
  def split(x):
    x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((padded // chunk, chunk) + x.shape[1:])
  out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in arrays))
  return jax.tree.map(lambda y: y.reshape((padded,) + y.shape[2:])[:n], out)


# Pixels per chunk of the fixed-threshold scores: their few passes each
# touch the chunk's maps once, which stays fastest at about 1M pixels (four
# 640x360 frames; BENCHMARKS.md, "Evaluation metrics").
FIXED_CHUNK_PIXELS = 1 << 20


def avatar_protocol(s, gt, thresholds: Sequence[float],
                    interpolation: str = 'bilinear'):
  """AVATAR's fixed-threshold scores of raw maps s [N, h, w] against 0/1 GT
  masks gt [N, H, W]: upsample to (H, W), min-max normalise, p > t: (cIoU,
  pIA), each [N, len(thresholds)] (`fixed_threshold_scores`; a frame whose
  GT is not 0/1 scores NaN). Evaluated about 1M pixels at a time."""
  size = gt.shape[-2:]
  def scores(s, gt):
    lo, hi = upsampled_range(s, size, interpolation)
    return fixed_threshold_scores(upsample_fused(s, size, interpolation), gt, thresholds,
                                  lo, hi)
  return over_frame_chunks(scores, s, gt,
                           chunk=max(1, FIXED_CHUNK_PIXELS // (size[0] * size[1])))


def ciou_above_thresholds(p, gt, thresholds: Sequence[float]):
  """cIoU of (p > t) for each t: [..., len(thresholds)]."""
  return scores_above_thresholds(p, gt, thresholds)[0]


def pointing_hit(s, gt):
  """The (first) argmax of the map lies on a pixel with positive GT weight."""
  idx = jnp.argmax(_flat(s), axis=-1)
  return jnp.take_along_axis(_flat(gt), idx[..., None], axis=-1)[..., 0] > 0


def pointing_offset(s, gt, grid):
  """Where the (first) argmax lies relative to the source, in model cells.

  s, gt: [..., H, W]; grid: the model's (h, w) map size, so a cell is H/h by
  W/w pixels. Returns (dy, dx, near): the argmax pixel minus the centroid of
  the GT pixels (NaN where the GT is empty), and whether a GT pixel lies
  within one cell of the argmax along both axes (a pointing hit with a
  one-cell tolerance). A model whose peak sits next to the object misses the
  pointing game but is `near`; a per-category mean (dy, dx) far from 0 is a
  learned offset rather than a wrong object.
  """
  h_px, w_px = s.shape[-2:]
  cell_y, cell_x = h_px / grid[0], w_px / grid[1]
  idx = jnp.argmax(_flat(s), axis=-1)
  y, x = (idx // w_px).astype(jnp.float32), (idx % w_px).astype(jnp.float32)
  on = jnp.asarray(gt) > 0
  yy = jnp.arange(h_px, dtype=jnp.float32)[:, None]
  xx = jnp.arange(w_px, dtype=jnp.float32)[None, :]
  n = on.sum(axis=(-2, -1)).astype(jnp.float32)
  safe_n = jnp.maximum(n, 1.0)
  cy = jnp.where(on, yy, 0.0).sum(axis=(-2, -1)) / safe_n
  cx = jnp.where(on, xx, 0.0).sum(axis=(-2, -1)) / safe_n
  dy = jnp.where(n > 0, (y - cy) / cell_y, jnp.nan)
  dx = jnp.where(n > 0, (x - cx) / cell_x, jnp.nan)
  close = ((jnp.abs(yy - y[..., None, None]) <= cell_y)
           & (jnp.abs(xx - x[..., None, None]) <= cell_x))
  return dy, dx, (on & close).any(axis=(-2, -1))


def pointing_min_hit(s, gt):
  """The (first) argmin lies on the source: the symptom of an inverted map."""
  return pointing_hit(-jnp.asarray(s), gt)


def sounding_silent_margin(s, gt, silent):
  """Mean of the map on the sounding pixels minus its mean on the visible
  silent ones, in the map's units; NaN where either region is empty.

  s: cosine maps [..., H, W] in [-1, 1]; gt, silent: masks of the same size.
  On Multi-entity frames the silent pixels are identical twins of the
  source, so a positive margin can only come from timing (chance: half the
  frames). Sums are order-free (see `_order_free_sum`) so that the sign does
  not depend on the batch shape.
  """
  a = _flat((jnp.clip(jnp.asarray(s, jnp.float32), -1.0, 1.0) + 1.0) / 2.0)
  inside, outside = _flat(jnp.asarray(gt) > 0), _flat(jnp.asarray(silent) > 0)
  one = jnp.ones(a.shape[:-1], jnp.float32)
  n_in, n_out = inside.sum(-1), outside.sum(-1)
  mean_in = _order_free_sum(a, inside, one) / jnp.maximum(n_in, 1)
  mean_out = _order_free_sum(a, outside, one) / jnp.maximum(n_out, 1)
  return jnp.where((n_in > 0) & (n_out > 0), 2.0 * (mean_in - mean_out), jnp.nan)


def map_mean(s):
  """Mean of cosine maps [..., H, W] (clipped to [-1, 1]), identical for any
  batch shape or sharding (an order-free sum; error <= 2**-19)."""
  a = _flat((jnp.clip(jnp.asarray(s, jnp.float32), -1.0, 1.0) + 1.0) / 2.0)
  total = _order_free_sum(a, jnp.ones(a.shape, bool), jnp.ones(a.shape[:-1], jnp.float32))
  return 2.0 * total / a.shape[-1] - 1.0


def _order_free_sum(x, where, scale):
  """sum(x[where]) for 0 <= x <= scale, identical for any batch shape or sharding.

  XLA's float reductions round differently when the batch shape changes (1
  vs N processes, other padding), so the sum is taken in 20-bit fixed point
  relative to `scale` (two int32 accumulators of 10 bits each, exact up to
  2**21 pixels per map) and converted back: relative error <= 2**-20.
  """
  q = jnp.round(x / scale[..., None] * 2.0**20).astype(jnp.int32)
  q = jnp.where(where, q, 0)
  hi = (q >> 10).sum(axis=-1).astype(jnp.float32)
  lo = (q & 1023).sum(axis=-1).astype(jnp.float32)
  return (hi * 1024.0 + lo) / 2.0**20 * scale


def confidence(a):
  """SLAVC: mean of the top quarter (q = N//4 pixels, at least 1) of |a|."""
  flat = jnp.abs(_flat(jnp.asarray(a, jnp.float32)))
  n = flat.shape[-1]
  q = max(1, n // 4)
  # The q-th largest value v; the top quarter = everything above v plus as
  # many copies of v as it takes to make q pixels.
  v = kth_smallest(flat, jnp.full(flat.shape[:-1], n - q))
  above = flat > v[..., None]
  peak = flat.max(axis=-1)
  scale = jnp.where(peak > 0, peak, 1.0)
  total = _order_free_sum(flat, above, scale) + (q - above.sum(axis=-1)) * v
  return total / q


def pia(pred):
  """Fraction of the image predicted positive (ideal 0 on a negative)."""
  return _sum_hw(jnp.asarray(pred).astype(jnp.int32)) / (pred.shape[-2] * pred.shape[-1])
