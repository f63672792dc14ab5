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
  assert '| b (1) | 20 | 100% | ' in table and '| 2 | 20 | 100% | ' in table


def test_audio_accuracy_and_rival_tell_a_deaf_audio_path_from_a_miswired_one():
  # D = 4, one axis per category's objects (no shared objectness axis).
  # Category 1's audio is distinct but points at category 2's objects
  # (mis-wired); categories 2 and 3 share one audio token (deaf to the
  # difference), which points at both their objects.
  e = np.eye(4)
  rng = np.random.default_rng(1)
  category = np.repeat([0, 1, 2, 3], 25)
  on_object = e[category] + 0.05 * rng.standard_normal((100, 4))
  background = 0.05 * rng.standard_normal((100, 4))
  audio_of = {0: e[0], 1: e[2] + 0.4 * e[1] - 0.6 * e[3], 2: e[2] + e[3], 3: e[2] + e[3]}
  audio = (np.stack([audio_of[c] for c in category])
           + 0.05 * rng.standard_normal((100, 4)))
  stats = category_probe.summarize(audio, on_object, background, category)
  # Independent float64 recomputation, category by category, with loops.
  unit = lambda v: v / np.linalg.norm(v)
  protos = {c: unit(audio[category == c].mean(0)) for c in range(4)}
  for c in range(4):
    mine = np.flatnonzero(category == c)
    hits = sum(max(range(4), key=lambda k: unit(audio[f]) @ protos[k]) == c for f in mine)
    assert stats[c]['audio_accuracy'] == pytest.approx(hits / len(mine))
    gives = {k: np.mean([(on_object[f] - background[f]) @ protos[c]
                         for f in np.flatnonzero(category == k)]) for k in range(4)}
    rival = max((k for k in range(4) if k != c), key=gives.get)
    assert stats[c]['rival'] == rival
    assert stats[c]['rival_contrast'] == pytest.approx(gives[rival])
    assert stats[c]['own_contrast'] == pytest.approx(gives[c])
  # What the columns are for:
  assert stats[0]['audio_accuracy'] == 1.0 and stats[1]['audio_accuracy'] == 1.0
  assert stats[1]['rival'] == 2 and stats[1]['rival_contrast'] > stats[1]['own_contrast']
  assert stats[0]['rival_contrast'] < stats[0]['own_contrast']
  assert max(stats[2]['audio_accuracy'], stats[3]['audio_accuracy']) < 0.8
  table = category_probe.format_table(stats, ['a', 'b', 'c', 'd'])
  assert '| b (1) | 25 | 100% | ' in table
  assert 'c (2) +' in table.splitlines()[3] and table.splitlines()[3].endswith('(above own) |')
  assert '(above own)' not in table.splitlines()[2]
