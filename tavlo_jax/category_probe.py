r"""Why is a category never learned? Its audio against the visual "objectness".

  python -m tavlo_jax.category_probe --checkpoint=workdirs/tavlo

runs a trained model over the first `--batches` eval batches and prints, per
sounding category (the eval batches' `category`), its frames, the component
of its mean audio embedding on the objectness direction o (mean visual
feature on sounding objects minus mean on background cells, unit length),
and its own map contrast: mean map on its own objects minus on background.
A category with a negative own contrast has maps that are cold on its own
object, i.e. pointing below chance; see losses.py, "Categories that are
never learned", for why centred audio makes some category do that.

Two more columns tell a deaf audio path from a mis-wired one:
  audio acc    the share of the category's frames whose audio token is
               nearest (cosine) to its own category's mean token: low means
               the audio encoder does not tell the category apart;
  rival        the other category whose objects the category's mean audio
               matches best, with that contrast (same measure as the own
               contrast). A rival above the own contrast means the audio is
               heard fine but points at another category's objects.
"""

from __future__ import annotations


import jax
import numpy as np
from absl import app, flags

from tavlo_jax import cli
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
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  protos = unit(np.stack([audio[category == c].mean(0) for c in cats]))
  # Mean object-minus-background feature per category: proto_c . contrast_k
  # is the mean map contrast that category c's audio gives category k's objects.
  contrasts = np.stack([(on_object - background)[category == c].mean(0)
                        for c in cats])
  nearest = cats[np.argmax(unit(audio) @ protos.T, axis=-1)]
  out = {}
  for i, c in enumerate(cats):
    mine = category == c
    gives = contrasts @ protos[i]                   # [K] over object categories
    others = [k for k in range(len(cats)) if k != i]
    rival = max(others, key=lambda k: gives[k]) if others else None
    out[int(c)] = {
        'frames': int(mine.sum()),
        'audio_on_objectness': float(protos[i] @ o),
        'own_contrast': float(gives[i]),
        'audio_accuracy': float(np.mean(nearest[mine] == c)),
        'rival': None if rival is None else int(cats[rival]),
        'rival_contrast': float('nan') if rival is None else float(gives[rival]),
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
  label = lambda c: f'{names[c]} ({c})' if names and c < len(names) else str(c)
  lines = ['| category | frames | audio acc | audio . objectness | '
           'own object - background | rival object - background |',
           '|---|---|---|---|---|---|']
  for c, r in sorted(stats.items()):
    rival = ('-' if r['rival'] is None
             else f"{label(r['rival'])} {r['rival_contrast']:+.3f}")
    if r['rival'] is not None and r['rival_contrast'] > r['own_contrast']:
      rival += ' (above own)'
    lines.append(f"| {label(c)} | {r['frames']} | {100 * r['audio_accuracy']:.0f}% | "
                 f"{r['audio_on_objectness']:+.3f} | {r['own_contrast']:+.3f} | "
                 f'{rival} |')
  return '\n'.join(lines)


@cli.user_errors()
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS.checkpoint:
    raise app.UsageError('--checkpoint is required (a training workdir or a step dir in it)')
  from tavlo_jax import input_data, models, trained_run  # pylint: disable=g-import-not-at-top
  try:
    run = trained_run.load_run(flags.FLAGS.checkpoint)
    config = run.config
    data = input_data.prepare(config)
    stats = summarize(*collect(models.build_model(config), run.variables, config,
                               data.eval_batches(config.dataset.eval_split),
                               flags.FLAGS.batches))
  except ValueError as e:   # trained_run.RunError included: one line, as localize does
    cli.fail(str(e))
  print(format_table(stats, data.category_names()))


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'Training workdir (or a step dir in it).')
  flags.DEFINE_integer('batches', 20, 'Eval batches to look at.')
  app.run(main)
