"""category_probe: the objectness diagnosis of never-learned categories."""
import numpy as np
import pytest

from tavlo_jax import category_probe


def test_grid_cover_is_the_area_fraction_per_cell():
  m = np.zeros((1, 4, 6), bool)
  m[0, :2, :3] = True                  # the top-left cell of a 2x2 grid
  m[0, 3, 5] = True                    # 1 of the 6 pixels of the bottom-right one
  np.testing.assert_allclose(category_probe.grid_cover(m, (2, 2))[0],
                             [[1, 0], [0, 1 / 6]])
  with pytest.raises(ValueError, match=r'\(4, 6\) is not a multiple .* \(3, 2\)'):
    category_probe.grid_cover(m, (3, 2))


def test_a_category_whose_audio_points_away_from_objects_is_flagged():
  # D = 4: axis 0 is what every object shares, axes 1-3 one per category.
  e = np.eye(4)
  rng = np.random.default_rng(0)
  category = np.repeat([0, 1, 2], 20)
  on_object = e[0] + e[category + 1] + 0.01 * rng.standard_normal((60, 4))
  background = 0.01 * rng.standard_normal((60, 4))
  audio_of = {0: e[1] + 0.5 * e[0], 1: 0.3 * e[2] - e[0], 2: e[3] + 0.2 * e[0]}
  audio = np.stack([audio_of[c] for c in category]) + 0.01 * rng.standard_normal((60, 4))
  stats = category_probe.summarize(audio, on_object, background, category)
  assert sorted(stats) == [0, 1, 2]
  assert [stats[c]['frames'] for c in range(3)] == [20, 20, 20]
  # Independent float64 recomputation.
  o = np.mean([on_object[category == c].mean(0) for c in range(3)], 0) - background.mean(0)
  o /= np.linalg.norm(o)
  for c in range(3):
    p = audio[category == c].mean(0)
    p /= np.linalg.norm(p)
    assert stats[c]['audio_on_objectness'] == pytest.approx(p @ o)
    assert stats[c]['own_contrast'] == pytest.approx(
        np.mean((on_object[category == c] - background[category == c]) @ p))
  # Category 1's audio points away from objects: its own object is cold.
  assert stats[1]['audio_on_objectness'] < 0 and stats[1]['own_contrast'] < 0
  assert all(stats[c]['own_contrast'] > 0 for c in (0, 2))
  table = category_probe.format_table(stats, ['a', 'b'])
  assert '| b (1) | 20 | ' in table and '| 2 | 20 | ' in table
