"""Golden (worked on paper) and reference-equality tests of the metric definitions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tavlo_jax.evaluation import aggregates, metrics, records, reference

A = np.asarray
# Jitted once per shape: op-by-op dispatch of the whole record is slower.
frame_scores = jax.jit(records.frame_scores,
                       static_argnames=('thresholds', 'interpolation', 'with_oracle'))


# ---- golden: per-frame ---------------------------------------------------------

def test_ciou_by_hand():
  gt = np.zeros((4, 4))
  gt[:2, :2] = 1                                   # 4 GT pixels
  pred = np.zeros((4, 4), bool)
  pred[0, :2] = pred[1, 0] = True                  # 3 inside
  pred[3, 2:] = True                               # 2 outside
  assert float(metrics.ciou(pred, gt)) == pytest.approx(3 / 6)   # 3 / (4 + 2)
  # Consensus weights: inter 1.5, sum(g) 1.5, predicted background 1.
  g = A([[1.0, 0.5], [0.0, 0.0]])
  p = A([[1, 1], [1, 0]], bool)
  assert float(metrics.ciou(p, g)) == pytest.approx(1.5 / 2.5)
  # Empty GT and empty prediction: 0, not NaN.
  assert float(metrics.ciou(np.zeros((2, 2), bool), np.zeros((2, 2)))) == 0.0


def test_top50_both_tie_rules():
  p = A([[0.0, 0.5], [0.5, 1.0]])                  # sorted: 0 .5 .5 1, element 2 = .5
  assert A(metrics.top50(p, strict=False)).sum() == 3
  assert A(metrics.top50(p, strict=True)).tolist() == [[False, False], [False, True]]
  saturated = A([[0.0, 1.0], [1.0, 1.0]])          # element 2 = 1
  assert A(metrics.top50(saturated, strict=False)).sum() == 3
  assert A(metrics.top50(saturated, strict=True)).sum() == 0


# Shapes shared by the record tests, so each jit compiles once per file.
N, SIZE, THRESHOLDS = 6, (12, 20), (0.1, 0.15, 0.2)


def test_flat_map_no_nan():
  flat = np.full((N, 3, 5), 0.12, np.float32)
  np.testing.assert_array_equal(A(metrics.normalize(flat)), flat)   # left as is
  flat[1] = 0.0
  gt = np.zeros((N,) + SIZE, np.float32)
  gt[:, 1:3, 2:4] = 1
  silent = np.zeros_like(gt)
  silent[:, 5:7, 8:10] = 1
  rec = frame_scores(jnp.asarray(flat), jnp.asarray(gt), thresholds=THRESHOLDS,
                     interpolation='bilinear', silent=jnp.asarray(silent))
  for k, v in rec.items():
    assert np.isfinite(A(v, np.float64)).all(), k
  np.testing.assert_array_equal(A(rec['silent_margin']), 0.0)   # flat: no preference
  # 0.12 > 0.1 everywhere, > 0.15 nowhere; top50 '>' keeps nothing, '>=' all.
  np.testing.assert_allclose(A(rec['pia'][0]), [1.0, 0.0, 0.0])
  assert float(rec['ciou_top50_gt'][0]) == 0.0
  assert float(rec['ciou_top50_ge'][0]) == pytest.approx(4 / 240)
  # All zeros: nothing above any threshold (a true negative), cIoU 0.
  assert A(rec['pia'][1]).tolist() == [0.0, 0.0, 0.0] and float(rec['ciou'][1, 0]) == 0.0


def test_nonflat_normalised_map_always_has_a_one():
  s = np.random.default_rng(0).normal(size=(6, 4, 4))
  assert (A(metrics.normalize(s)).max(axis=(1, 2)) == 1).all()


def test_adaptive_topk_keeps_exactly_k_ties_by_index():
  p = A([[[1.0, 0.5], [0.5, 0.0]]])
  assert A(metrics.adaptive_topk(p, A([2]))).tolist() == [[[True, True], [False, False]]]
  assert A(metrics.adaptive_topk(p, A([0]))).sum() == 0
  assert A(metrics.adaptive_topk(np.zeros((1, 3, 3)), A([4]))).sum() == 4


def test_pointing_game_first_argmax():
  s = A([[0.0, 1.0], [1.0, 0.0]])                  # tie: flat index 1 wins
  assert bool(metrics.pointing_hit(s, A([[0, 1], [0, 0]])))
  assert not bool(metrics.pointing_hit(s, A([[0, 0], [1, 0]])))
  assert bool(metrics.pointing_min_hit(s, A([[1, 0], [0, 0]])))


def test_pointing_offset_in_model_cells():
  # 8x8 pixels from a 2x2 model grid: a cell is 4x4 pixels.
  gt = np.zeros((8, 8)); gt[0:2, 0:2] = 1                    # centroid (0.5, 0.5)
  s = np.zeros((8, 8)); s[5, 2] = 1.0                        # argmax (5, 2)
  dy, dx, near = (np.asarray(v) for v in metrics.pointing_offset(A(s), A(gt), (2, 2)))
  assert float(dy) == pytest.approx(4.5 / 4) and float(dx) == pytest.approx(1.5 / 4)
  assert bool(near)                         # GT row 1 is 4 rows (one cell) above row 5
  s2 = np.zeros((8, 8)); s2[6, 2] = 1.0                      # 5 rows below the GT
  assert not bool(metrics.pointing_offset(A(s2), A(gt), (2, 2))[2])
  # Empty GT: NaN offsets, never near.
  dy, dx, near = metrics.pointing_offset(A(s), A(np.zeros((8, 8))), (2, 2))
  assert np.isnan(float(dy)) and np.isnan(float(dx)) and not bool(near)
  # A batch agrees with the float64 reference frame by frame.
  rng = np.random.default_rng(0)
  maps, gts = rng.normal(size=(6, 12, 16)), rng.random((6, 12, 16)) > 0.9
  got = [np.asarray(v) for v in metrics.pointing_offset(A(maps), A(gts), (3, 4))]
  for i in range(6):
    want = reference.pointing_offset(maps[i], gts[i], (3, 4))
    np.testing.assert_allclose([got[0][i], got[1][i]], want[:2], rtol=1e-5)
    assert bool(got[2][i]) == want[2]


def test_confidence_and_pia():
  a = np.arange(16, dtype=np.float32).reshape(4, 4)   # top quarter: 12..15
  assert float(metrics.confidence(a)) == pytest.approx(13.5)
  assert float(metrics.confidence(-a)) == pytest.approx(13.5)
  assert float(metrics.pia(A([[True, False], [True, False]]))) == 0.5


def test_box_union_peer_rasterisation():
  boxes = A([[0.25, 0.0, 0.75, 0.5], [-0.5, 0.5, 0.3, 2.0]])   # second one clipped
  g = A(metrics.box_union(boxes, A([True, True]), 4, 4))
  want = np.zeros((4, 4))
  want[0:2, 1:3] = 1                               # x 1..3, y 0..2 (half-open)
  want[2:4, 0:1] = 1                               # x 0..int(1.2)=1, y 2..4
  np.testing.assert_array_equal(g, want)
  np.testing.assert_array_equal(g, reference.box_union(boxes, 4, 4))
  assert A(metrics.box_union(boxes, A([False, False]), 4, 4)).sum() == 0


def test_consensus_two_annotators():
  boxes = A([[0, 0, 128, 128], [64, 64, 192, 192]])  # -> [0,0,2,2] and [1,1,3,3] at 4 px
  g = A(metrics.consensus_map(boxes, A([True, True]), size=4))
  want = np.zeros((4, 4))
  want[0:2, 0:2] += 0.5
  want[1:3, 1:3] += 0.5
  np.testing.assert_array_equal(g, want)           # overlap pixel weighs 1
  np.testing.assert_array_equal(g, reference.consensus_map(boxes, size=4))


def test_grid_oracle_aligned_block_is_perfect():
  gt = np.zeros((N,) + SIZE, np.float32)
  gt[0, :3, :5] = 1                                # exactly one cell of a 4x4 grid
  gt[1, 2:7, 3:11] = 1                             # straddles cells
  rec = frame_scores(jnp.zeros((N, 4, 4)), jnp.asarray(gt), thresholds=THRESHOLDS,
                     interpolation='nearest')
  assert float(rec['oracle_best'][0]) == 1.0 and float(rec['oracle_adaptive'][0]) == 1.0
  assert 0.0 < float(rec['oracle_best'][1]) < 1.0
  # A grid as fine as the mask can reproduce any GT.
  rec = frame_scores(jnp.zeros((N,) + SIZE), jnp.asarray(gt), thresholds=THRESHOLDS,
                     interpolation='bilinear')
  assert float(rec['oracle_best'][1]) == 1.0


# ---- golden: aggregates ---------------------------------------------------------

def test_auc_by_hand():
  # y = 1 at t=0, 2/3 for t in (0, .5], 1/3 for t in (.5, 1].
  want = (1 + 2 / 3) / 2 * 0.05 + 9 * 0.05 * 2 / 3 + (2 / 3 + 1 / 3) / 2 * 0.05 + 9 * 0.05 / 3
  assert aggregates.auc([0.0, 0.5, 1.0]) == pytest.approx(want)
  assert reference.auc([0.0, 0.5, 1.0]) == pytest.approx(want)
  assert aggregates.success_rate([0.0, 0.5, 1.0]) == pytest.approx(2 / 3)


def test_tn_rules_by_hand():
  pia = A([0.0, 0.25, 0.0, 0.9])
  assert aggregates.true_negative_rate(
      aggregates.offscreen_negative('no_pixel_above', pia_at_threshold=pia)) == 0.5
  raw = A([0.1, 0.5, 0.3, 0.7])
  assert aggregates.true_negative_rate(aggregates.offscreen_negative(
      'raw_max', raw_max=raw, raw_threshold=0.4)) == 0.5
  with pytest.raises(ValueError, match='calibrated'):
    aggregates.offscreen_negative('raw_max', raw_max=raw)
  with pytest.raises(ValueError, match='no_pixel_above'):
    aggregates.offscreen_negative('maximum', raw_max=raw)


def test_pia_aoc_by_hand():
  # y = fraction(pIA <= t) = 1/2 at t = 0 .. .45, 1 at t = .5 .. 1:
  # 9 segments at 1/2, one trapezoid (1/2 + 1) / 2, 10 segments at 1.
  want = 9 * 0.05 / 2 + 0.05 * 0.75 + 10 * 0.05
  assert aggregates.pia_aoc([0.0, 0.5]) == pytest.approx(want)
  assert reference.pia_aoc([0.0, 0.5]) == pytest.approx(want)


def test_slavc_ap_and_f1_by_hand():
  is_pos = A([True, True, False, True])
  cious = A([0.8, 0.2, 0.0, 0.9])
  conf = A([0.9, 0.7, 0.8, 0.3])
  # Thresholds .8, .7, .3 -> (P, R) = (1/2, 1/3), (1/3, 1/2), (1/2, 1);
  # monotone P = 1/2, 1/2, 1/2 -> AP = 1/2 * 1/6 + 1/2 * 1/2.
  assert aggregates.slavc_ap(is_pos, cious, conf) == pytest.approx(1 / 3)
  assert reference.slavc_ap(is_pos, cious, conf) == pytest.approx(1 / 3)
  # F1 at .3, .7, .8, .9 = 2/3, .4, .4, .5.
  assert aggregates.slavc_max_f1(is_pos, cious, conf) == pytest.approx(2 / 3)


def test_calibration_by_hand():
  raw = np.linspace(0.1, 1.0, 10)
  thr = aggregates.calibrate_raw_threshold(raw, 0.9)
  assert thr == pytest.approx(0.2) and (raw >= thr).mean() == pytest.approx(0.9)
  assert thr == reference.calibrate_raw_threshold(raw, 0.9)


def test_window_quantile_by_hand_and_against_reference():
  # One clip, frames 0, 1, 2, 5; +-1 frame: {0,1}, {0,1,2}, {1,2}, {5}.
  clip, frame = [7, 7, 7, 7], [0, 1, 2, 5]
  v = [0.1, 0.5, 0.3, 0.9]
  np.testing.assert_allclose(aggregates.window_quantile(clip, frame, v, 1, 1.0),
                             [0.5, 0.5, 0.5, 0.9])
  np.testing.assert_allclose(aggregates.window_quantile(clip, frame, v, 1, 0.5),
                             [0.3, 0.3, 0.4, 0.9])
  # half_width 0 gives the values back; frames of other clips never mix in.
  np.testing.assert_allclose(aggregates.window_quantile(clip, frame, v, 0, 0.9), v)
  rng = np.random.default_rng(3)
  n = 200
  clip = rng.integers(0, 9, n)                      # unsorted, as a pool's rows may be
  frame = rng.integers(0, 32, n)
  vals = rng.normal(size=n)
  for half_width, q in ((0, 0.75), (2, 0.9), (8, 0.9), (40, 0.5)):
    np.testing.assert_allclose(
        aggregates.window_quantile(clip, frame, vals, half_width, q),
        reference.window_quantile(clip, frame, vals, half_width, q), atol=1e-12)
  assert aggregates.window_quantile([], [], [], 3, 0.9).shape == (0,)
  with pytest.raises(ValueError, match='differ in length'):
    aggregates.window_quantile([0, 0], [0], [1.0, 2.0], 1, 0.5)
  with pytest.raises(ValueError, match='half_width'):
    aggregates.window_quantile([0], [0], [1.0], 1, 1.5)


def test_negative_aware_f():
  assert aggregates.negative_aware_f(50.0, 50.0) == pytest.approx(50.0)
  assert aggregates.negative_aware_f(0.0, 100.0) == 0.0


# ---- properties and reference equality ----------------------------------------

def test_auc_close_to_mean_property():
  rng = np.random.default_rng(1)
  for trial in range(300):
    n = rng.integers(1, 60)
    kind = trial % 3
    if kind == 0:
      c = rng.uniform(size=n)
    elif kind == 1:          # values sitting on the thresholds
      c = rng.integers(0, 21, size=n) * 0.05
    else:
      c = rng.beta(0.3, 0.3, size=n)
    assert abs(aggregates.auc(c) - c.mean()) <= 0.025 + 1e-12


def test_aggregates_match_reference():
  rng = np.random.default_rng(2)
  for m in (7, 45, 450):     # 450: SLAVC steps of M//200 = 2 and M//10 = 45
    is_pos = rng.uniform(size=m) < 0.7
    cious = rng.uniform(size=m)
    conf = rng.uniform(size=m)
    assert aggregates.slavc_ap(is_pos, cious, conf) == pytest.approx(
        reference.slavc_ap(is_pos, cious, conf), abs=1e-12)
    assert aggregates.slavc_max_f1(is_pos, cious, conf) == pytest.approx(
        reference.slavc_max_f1(is_pos, cious, conf), abs=1e-12)
    assert aggregates.auc(cious) == pytest.approx(reference.auc(cious), abs=1e-12)
    assert aggregates.pia_aoc(cious) == pytest.approx(reference.pia_aoc(cious), abs=1e-12)
    for tpr in (0.5, 0.9, 1.0):
      assert aggregates.calibrate_raw_threshold(conf, tpr) == \
          reference.calibrate_raw_threshold(conf, tpr)


@pytest.mark.parametrize('method', ['bilinear', 'nearest', 'bicubic'])
def test_upsample_matches_reference(method):
  s = np.random.default_rng(3).normal(size=(2, 3, 5)).astype(np.float32)
  got = A(metrics.upsample(s, (13, 21), method))
  for i in range(2):
    np.testing.assert_allclose(got[i], reference.resize(s[i], (13, 21), method), atol=2e-6)


def test_area_pooling_matches_reference():
  g = (np.random.default_rng(4).uniform(size=(1, 13, 21)) > 0.5).astype(np.float32)
  got = A(jax.image.resize(g, (1, 3, 5), 'area', antialias=True))
  np.testing.assert_allclose(got[0], reference.resize(g[0], (3, 5), 'area'), atol=2e-6)


def _blobs(rng, n, h, w):
  """Random GT: one rectangle per frame (some frames empty)."""
  gt = np.zeros((n, h, w), np.float32)
  for i in range(n - 1):
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    gt[i, y0:y0 + rng.integers(2, h - y0 + 1), x0:x0 + rng.integers(2, w - x0 + 1)] = 1
  return gt


@pytest.mark.parametrize('method,grid', [('bilinear', (3, 5)), ('nearest', (4, 4)),
                                         ('bilinear', SIZE)])
def test_frame_scores_match_float64_reference(method, grid):
  rng = np.random.default_rng(5)
  n, size, thresholds = N, SIZE, THRESHOLDS
  heat = np.tanh(rng.normal(size=(n,) + grid)).astype(np.float32)
  heat[-1] = 0.25                                  # a flat map too
  gt = _blobs(rng, n, *size)
  got = jax.tree.map(A, frame_scores(jnp.asarray(heat), jnp.asarray(gt),
                                             thresholds=thresholds, interpolation=method))
  for i in range(n):
    want = reference.frame_scores(heat[i], gt[i], size, thresholds, method)
    for k, v in want.items():
      np.testing.assert_allclose(A(got[k][i], np.float64), A(v, np.float64), atol=1e-5,
                                 err_msg=f'{k} frame {i}')


@pytest.mark.parametrize('thresholds', [(0.1, 0.15, 0.2), (0.3,), (0.05, 0.5, 0.25, 0.9)])
def test_fixed_threshold_scores_match_float64_reference(thresholds):
  """The packed raw-map counts (two thresholds per pass, an odd one paired
  with -inf) against the float64 loop, for 0/1 GT and, with weighted=True,
  for weights; flat, all-zero and non-finite maps included."""
  rng = np.random.default_rng(len(thresholds))
  n, size = 9, (30, 52)
  heat = np.tanh(rng.normal(size=(n, 5, 7))).astype(np.float32)
  heat[0] = 0.5                                    # flat: p = 0.5 everywhere
  heat[1] = 0.0                                    # flat zero: nothing above
  heat[2, 1, 1] = np.nan                           # not finite: predicts nothing
  binary = _blobs(rng, n, *size)
  weights = binary * rng.choice([0.25, 0.5, 1.0], size=binary.shape).astype(np.float32)
  up = metrics.upsample(heat, size)
  for gt, weighted in ((binary, False), (weights, True)):
    ciou, pia = (A(x) for x in jax.jit(functools.partial(
        metrics.fixed_threshold_scores, thresholds=thresholds, weighted=weighted))(up, gt))
    for i in range(n):
      if i == 2:
        assert ciou[i].tolist() == [0.0] * len(thresholds) and pia[i].tolist() == ciou[i].tolist()
        continue
      p = reference.normalize(reference.resize(heat[i], size, 'bilinear'))
      np.testing.assert_allclose(ciou[i], [reference.ciou(p > t, gt[i]) for t in thresholds],
                                 atol=1e-6, err_msg=f'frame {i}')
      np.testing.assert_allclose(pia[i], [reference.pia(p > t) for t in thresholds], atol=1e-6)


def test_fixed_threshold_scores_refuse_weights_unless_told():
  """A GT that is not 0/1 cannot be packed: those frames score NaN (not a
  wrong number) unless weighted=True; 0/1 frames of the batch are unaffected."""
  heat = np.tanh(np.random.default_rng(0).normal(size=(2, 4, 4))).astype(np.float32)
  gt = np.zeros((2, 16, 16), np.float32)
  gt[:, 4:10, 4:10] = 1
  gt[1, 5, 5] = 0.5
  ciou, _ = metrics.fixed_threshold_scores(metrics.upsample(heat, (16, 16)), gt, (0.1, 0.2))
  assert np.isfinite(A(ciou[0])).all() and np.isnan(A(ciou[1])).all()


@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest'])
@pytest.mark.parametrize('grid,size', [((8, 8), (360, 640)), ((4, 6), (36, 64)),
                                       ((7, 7), (224, 224)), ((3, 3), (3, 3))])
def test_upsampled_range_is_the_full_maps_min_and_max(interpolation, grid, size):
  """Extremes from the corner rows and columns of each bilinear cell equal
  the full upsampled map's (to float rounding), including maps whose
  extreme sits at a clamped border."""
  heat = np.random.default_rng(1).normal(size=(5,) + grid).astype(np.float32)
  heat[0, 0, 0] = 9.0                              # the border cell holds the max
  up = A(metrics.upsample(heat, size, interpolation))
  lo, hi = (A(x) for x in metrics.upsampled_range(heat, size, interpolation))
  np.testing.assert_allclose(lo, up.min(axis=(1, 2)), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(hi, up.max(axis=(1, 2)), rtol=1e-6, atol=1e-6)


def test_sounding_silent_margin_by_hand():
  """Two identical twins: the map is 0.8 on the silent one, 0.2 on the
  source, -0.5 elsewhere: the margin is -0.6 (the map prefers the wrong
  twin); no silent pixel, or no source pixel, gives NaN."""
  gt, silent = np.zeros((2, 6, 6), bool), np.zeros((2, 6, 6), bool)
  gt[:, 1:3, 1:3] = True
  silent[0, 3:5, 3:5] = True
  s = np.full((2, 6, 6), -0.5, np.float32)
  s[:, 1:3, 1:3] = 0.2
  s[:, 3:5, 3:5] = 0.8
  got = A(metrics.sounding_silent_margin(jnp.asarray(s), jnp.asarray(gt), jnp.asarray(silent)))
  assert got[0] == pytest.approx(-0.6, abs=1e-5) and np.isnan(got[1])
  assert np.isnan(A(metrics.sounding_silent_margin(jnp.asarray(s), jnp.zeros((2, 6, 6)),
                                                   jnp.asarray(silent)))[0])
  assert got[0] == pytest.approx(reference.sounding_silent_margin(s[0], gt[0], silent[0]),
                                 abs=1e-5)


def test_metrics_are_jittable_on_batches():
  p = jnp.asarray(np.random.default_rng(6).uniform(size=(3, 4, 4)), jnp.float32)
  f = jax.jit(lambda p, k: (metrics.top50(p, True), metrics.adaptive_topk(p, k),
                            metrics.confidence(p), metrics.pointing_hit(p, p > 0.5)))
  top, ada, conf, hit = f(p, jnp.array([1, 2, 3]))
  assert top.shape == (3, 4, 4) and A(ada).sum() == 6 and conf.shape == (3,)
  assert math.isfinite(float(conf.sum())) and hit.shape == (3,)


def test_rounding_wobble_counts_as_flat_but_a_small_real_spread_does_not():
  # A constant map upsampled by weights that sum to 1 only within rounding
  # comes back wobbling by an ulp on some CPUs; min-max must not blow that up.
  wobble = np.full((3, 5), 0.12, np.float32)
  wobble[1, 2] = np.nextafter(np.float32(0.12), np.float32(1))
  wobble[0, 0] = np.nextafter(np.float32(0.12), np.float32(0))
  np.testing.assert_array_equal(A(metrics.normalize(wobble)), wobble.max())
  np.testing.assert_array_equal(reference.normalize(wobble), wobble.max())
  # Both sides of the 16-epsilon line, float32 implementation against the
  # float64 reference: 8 ulps of spread is flat, 64 ulps is a (tiny) peak.
  for ulps, flat in ((8, True), (64, False)):
    m = np.full((4, 4), 0.5, np.float32)
    m[2, 1] = 0.5 + ulps * np.spacing(np.float32(0.5))
    got, ref = A(metrics.normalize(m), np.float64), reference.normalize(m)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert (np.ptp(ref) == 0) == flat and (np.ptp(got) == 0) == flat
  small = np.full((3, 5), 0.12, np.float32)
  small[1, 2] = 0.1201                      # a real (if faint) peak
  p = A(metrics.normalize(small), np.float64)
  np.testing.assert_allclose(p, reference.normalize(small), atol=1e-6)
  assert p.max() == 1.0 and p.min() == 0.0


@pytest.mark.parametrize('n', [5, 8, 19])    # under, at and over a chunk
def test_avatar_protocol_in_chunks_matches_float64_reference(n):
  """The chunked AVATAR protocol (upsample, min-max, p > t at 0.1/0.15/0.2:
  cIoU and pIA) against the per-frame float64 loop, and bit for bit against
  the same steps on the whole batch at once."""
  rng = np.random.default_rng(n)
  thresholds = (0.1, 0.15, 0.2)
  heat = np.tanh(rng.normal(size=(n, 4, 6))).astype(np.float32)
  heat[0] = 0.5                                    # a flat map too
  gt = _blobs(rng, n, 36, 64)
  ciou, pia = (A(x) for x in jax.jit(
      lambda h, g: metrics.avatar_protocol(h, g, thresholds))(heat, gt))
  for i in range(n):
    p = reference.normalize(reference.resize(heat[i], (36, 64), 'bilinear'))
    np.testing.assert_allclose(ciou[i], [reference.ciou(p > t, gt[i])
                                         for t in thresholds], atol=1e-5)
    np.testing.assert_allclose(pia[i], [reference.pia(p > t)
                                        for t in thresholds], atol=1e-5)
  whole = jax.jit(lambda h, g: metrics.scores_above_thresholds(
      metrics.normalize(metrics.upsample(h, (36, 64))), g, thresholds))
  for got, want in zip((ciou, pia), whole(heat, gt)):
    np.testing.assert_array_equal(got, A(want))
