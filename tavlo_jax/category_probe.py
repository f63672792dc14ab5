r"""Why is a category never learned? Its audio against the visual "objectness".

  python -m tavlo_jax.category_probe --checkpoint=workdirs/compare/tavlo_seed0

runs a trained model over the first `--batches` eval batches and prints, per
sounding category (the eval batches' `category`), its frames, the component
of its mean audio embedding on the objectness direction o (mean visual
feature on sounding objects minus mean on background cells, unit length),
and its own map contrast: mean map on its own objects minus on background.
A category with a negative own contrast has maps that are cold on its own
object, i.e. pointing below chance; see losses.py, "Categories that are
never learned", for why centred audio makes some category do that.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags

from tavlo_jax.evaluation import metrics

OBJECT_COVER = 0.4       # a grid cell is "on the source" if this much of it is
BACKGROUND_COVER = 0.05  # ... "background" if at most this much holds any object


def grid_cover(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Area fraction of each grid cell covered: masks [..., H, W] -> [..., h, w]."""
  h, w = grid
  mh, mw = masks.shape[-2:]
  if mh % h or mw % w:
    raise ValueError(f'mask size {(mh, mw)} is not a multiple of the model grid '
                     f'{(h, w)}')
  return np.asarray(metrics.area_average(masks, grid))


def summarize(audio, on_object, background, category) -> dict[int, dict]:
  """Per-frame vectors [F, D] and category [F] -> {category: stats}.

  audio: the frame's audio token; on_object / background: mean visual feature
  over the frame's source cells / background cells.
  """
  audio, on_object, background = (np.asarray(x, np.float64)
                                  for x in (audio, on_object, background))
  category = np.asarray(category)
  cats = np.unique(category[category >= 0])
  objectness = (np.mean([on_object[category == c].mean(0) for c in cats], 0)
                - background.mean(0))
  o = objectness / np.linalg.norm(objectness)
  out = {}
  for c in cats:
    mine = category == c
    proto = audio[mine].mean(0)
    proto /= np.linalg.norm(proto)
    out[int(c)] = {
        'frames': int(mine.sum()),
        'audio_on_objectness': float(proto @ o),
        'own_contrast': float(np.mean((on_object[mine] - background[mine]) @ proto)),
    }
  return out


def collect(model, variables, config, batches, max_batches: int):
  """(audio, on_object, background, category) over annotated frames."""
  from tavlo_jax.data import audio as audio_lib  # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda f, a: model.apply(variables, f, a, train=False))
  rows = []
  for k, batch in enumerate(batches):
    if k >= max_batches:
      break
    batch = jax.tree.map(np.asarray, batch)
    out = jax.tree.map(np.asarray, apply(batch['frames'],
                                         audio_lib.audio_features(batch, config)))
    visual = out['visual']                             # [B, T, h, w, D]
    audio = out['audio']
    if audio.ndim == 2:                                # one clip-level token
      audio = np.broadcast_to(audio[:, None], visual.shape[:2] + audio.shape[-1:])
    grid = visual.shape[2:4]
    src = grid_cover(batch['gt_mask'] > 0, grid) > OBJECT_COVER
    bg = grid_cover(batch['any_mask'] > 0, grid) <= BACKGROUND_COVER
    keep = (batch['valid'][:, None] & batch['ann_valid'] & (batch['category'] >= 0)
            & src.any((-2, -1)) & bg.any((-2, -1)))
    for b, t in zip(*np.nonzero(keep)):
      rows.append((audio[b, t], visual[b, t][src[b, t]].mean(0),
                   visual[b, t][bg[b, t]].mean(0), batch['category'][b, t]))
  if not rows:
    raise ValueError('no annotated frame with a single sounding category in the '
                     'eval batches looked at; raise --batches')
  return [np.stack(x) for x in zip(*rows)]


def format_table(stats: dict[int, dict], names=None) -> str:
  lines = ['| category | frames | audio . objectness | own object - background |',
           '|---|---|---|---|']
  for c, r in sorted(stats.items()):
    name = f'{names[c]} ({c})' if names and c < len(names) else str(c)
    lines.append(f"| {name} | {r['frames']} | {r['audio_on_objectness']:+.3f} | "
                 f"{r['own_contrast']:+.3f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  from tavlo_jax import input_data, localize, models  # pylint: disable=g-import-not-at-top
  try:
    run = localize.load_run(flags.FLAGS.checkpoint)
    config = run.config
    data = input_data.prepare(config)
    stats = summarize(*collect(models.build_model(config), run.variables, config,
                               data.eval_batches(config.dataset.eval_split),
                               flags.FLAGS.batches))
  except (localize.LocalizeError, ValueError) as e:   # one line, as localize does
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_table(stats, data.category_names()))


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'Training workdir (or a step dir in it).',
                      required=True)
  flags.DEFINE_integer('batches', 20, 'Eval batches to look at.')
  app.run(main)
