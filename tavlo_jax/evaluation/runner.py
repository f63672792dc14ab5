"""Runs the model over eval splits and turns heat maps into reports.

  validation split -> Off-screen raw threshold (calibration, never on test)
  test split       -> per-frame records -> pooled per `config.evals` entry
                   -> eval/step_<N>/{eval.json, eval.md, eval_frames.csv,
                      overlays/*.png|gif} + TensorBoard scalars and images

Every process runs the same number of batches and calls every collective;
only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tavlo_jax.data import pipeline
from tavlo_jax.evaluation import evaluator as evaluator_lib
from tavlo_jax.evaluation import report, visualize

# How many leading test batches are kept on the host for overlays.
_OVERLAY_BATCHES = 2


def eval_groups(config) -> dict[tuple[str, str, str, str], list[str]]:
  """(dataset, split, protocol, interpolation) -> the `config.evals` entries
  scored together.

  An entry's optional `dataset` ('name/builder_config') scores it on another
  test set than the run's (e.g. VGG-SS and Flickr-SoundNet beside AVATAR),
  on its own `split`, with its optional `protocol` and `interpolation`;
  entries without one share the run's eval dataset, split and config.eval
  choices (dataset '').
  """
  groups: dict[tuple[str, str, str, str], list[str]] = {}
  for name, entry in config.evals.items():
    dataset = entry.get('dataset', '')
    split = entry.split if dataset else ''
    protocol = entry.get('protocol', '') or config.eval.protocol
    interpolation = entry.get('interpolation', '') or config.eval.interpolation
    groups.setdefault((dataset, split, protocol, interpolation), []).append(name)
  return groups


def predict_split(config, state, predict_fn, data, mesh, split: str,
                  keep_batches: int = 0, desc: str = '', protocol: str = '',
                  eval_names=None, interpolation: str | None = None):
  """Scores `split`; returns (evaluator, kept host batches with their maps)."""
  from tavlo_jax import input_data  # pylint: disable=g-import-not-at-top
  ev = evaluator_lib.Evaluator(config, protocol=protocol or config.eval.protocol, mesh=mesh,
                               category_names=data.category_names(),
                               eval_names=eval_names, interpolation=interpolation)
  batches = data.eval_batches(split)
  kept = []
  t0 = time.perf_counter()
  for i, host_batch in enumerate(batches):
    batch = pipeline.make_global_batch(host_batch, mesh)
    heatmap = predict_fn(state, batch)
    ev.add(batch, heatmap)
    if i < keep_batches:
      # Collective on purpose: every process takes part, process 0 keeps rows.
      full = multihost_utils.process_allgather(heatmap, tiled=True)
      rows = len(host_batch['valid'])
      kept.append((host_batch, np.asarray(full)[:rows]))
    if (i + 1) % 10 == 0 or i + 1 == len(batches):
      elapsed = time.perf_counter() - t0
      logging.info('eval %s: batch %d/%d (%.1f s, ETA %.0f s)',
                   split if desc in ('', split) else f'{desc} ({split})', i + 1,
                   len(batches), elapsed, elapsed / (i + 1) * (len(batches) - i - 1))
  return ev, kept


def scored_dataset(config) -> str:
  """'name/builder_config' of the dataset evaluated: the eval dataset when
  one is set (AVATAR while training on VGGSound), else the training one."""
  d = config.dataset
  if d.eval_name:
    return f'{d.eval_name}/{d.eval_builder_config}'.rstrip('/')
  return f'{d.name}/{d.builder_config}'.rstrip('/')


# (workdir, eval names, reason) of the skips already logged in this process.
_SKIPS_WARNED = set()


def evaluate(config, workdir, state, predict_fn, data, mesh, writer, *, step: int,
             final: bool) -> dict:
  """Scores every group of `config.evals` (eval_groups); returns the run's own
  eval dataset's results (those of the first group scored if it has none)."""
  from tavlo_jax import input_data  # pylint: disable=g-import-not-at-top
  results = None
  for (dataset, split, protocol, interpolation), names in eval_groups(config).items():
    choices = dict(names=names, protocol=protocol, interpolation=interpolation)
    if not dataset:
      out = _evaluate_group(config, workdir, state, predict_fn, data, mesh, writer,
                            step=step, final=final, **choices)
      results = out
      continue
    other, why = input_data.eval_only_data(config, dataset)
    if other is None or not other.has_split(split):
      why = why or f'{dataset} has no split {split!r}'
      # Once per run and reason, not at every intermediate evaluation.
      if (str(workdir), tuple(names), why) not in _SKIPS_WARNED:
        _SKIPS_WARNED.add((str(workdir), tuple(names), why))
        logging.warning('Skipping config.evals %s: %s', ', '.join(names), why)
      if final:
        print(f'\nSkipped config.evals {", ".join(names)}: {why}', flush=True)
      continue
    out = _evaluate_group(config, workdir, state, predict_fn, other, mesh, writer,
                          step=step, final=final, dataset=dataset, split=split, **choices)
    results = out if results is None else results
  return results


def _evaluate_group(config, workdir, state, predict_fn, data, mesh, writer, *, step: int,
                    final: bool, names, protocol: str, interpolation: str,
                    dataset: str = '', split: str = '') -> dict:
  """One eval dataset and split: the run's own ('' dataset; calibrated on its
  validation split) or another test set (reported in a sub-folder named by it)."""
  calibration = None
  d = config.dataset
  own = not dataset
  if (own and config.eval.offscreen_rule != 'no_pixel_above'
      and data.has_split(d.val_split)):
    val_ev, _ = predict_split(config, state, predict_fn, data, mesh, d.val_split,
                              desc='calibration', protocol=protocol, eval_names=names,
                              interpolation=interpolation)
    calibration = val_ev.calibrate()
    logging.info('Off-screen raw threshold calibrated on %s: %s', d.val_split,
                 json.dumps(calibration))
  split = split or d.eval_split
  ev, kept = predict_split(config, state, predict_fn, data, mesh, split,
                           keep_batches=_OVERLAY_BATCHES, desc=dataset or 'test',
                           protocol=protocol, eval_names=names, interpolation=interpolation)
  table = ev.records()
  results = ev.finalize(calibration)
  results['step'] = step
  results['split'] = split
  results['dataset'] = dataset or scored_dataset(config)
  results['model'] = config.model.name

  writer.scalars(step, evaluator_lib.scalar_metrics(results))
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval', f'step_{step}')
    if not own:   # e.g. eval/step_N/vggss_test_plus_silent/
      out_dir = os.path.join(out_dir, f"{dataset.split('/')[0]}_{split}")
    paths = report.write(out_dir, results, table)
    images = _overlays(config, table, kept, os.path.join(out_dir, 'overlays'), names)
    writer.images(step, images)
    table_text = report.format_table(results)
    sign = results.get('map_sign', {})
    if not final:  # the final table is printed below; log it only once
      logging.info('Evaluation at step %d (%s):\n%s', step, paths['markdown'], table_text)
    if sign.get('inverted'):
      logging.warning('MAP SIGN CHECK: the maps look inverted (the minimum lands on the '
                      'source more often than the maximum): %s', json.dumps(sign))
    if final:
      # The one thing a user running the main job wants to see.
      print(f'\n{results["dataset"]} {split}, {config.model.name}, step {step}\n'
            f'{table_text}\nReports: {out_dir}', flush=True)
  return results


def _overlays(config, table, kept, out_dir, names) -> dict[str, np.ndarray]:
  """PNG grid + GIF for the first clips of each scenario; TensorBoard images."""
  images = {}
  n = int(config.eval.num_visualized_clips)
  for name in names:
    entry = config.evals[name]
    wanted = set(visualize.select_clips(table, entry.frames, 10 ** 6))
    done = 0
    for host_batch, heat in kept:
      for r in range(len(host_batch['valid'])):
        clip = int(host_batch['clip_index'][r])
        if done >= n or not host_batch['valid'][r] or clip not in wanted:
          continue
        label = f'{name}_clip{clip}_f{int(host_batch["frame_index"][r][0])}'
        visualize.write_clip(out_dir, label, host_batch['frames'][r], heat[r],
                             host_batch['gt_mask'][r], host_batch['ann_valid'][r])
        images.update(visualize.tensorboard_images(host_batch, heat, [r],
                                                   prefix=f'overlay/{name}/'))
        done += 1
  return images
