"""The peers' published classic-benchmark numbers, printed beside ours.

Percent, as each paper reports it with its own protocol and checkpoint
choice (training set in the label). `cIoU` in these tables is the rate of
samples with cIoU >= 0.5 (our 'cIoU top50>=0.5' column), AUC the area over
the 21 thresholds; AP / max-F1 are SLAVC's, on its extended sets.
"""

from __future__ import annotations

# (dataset name, split) -> [(method [training set], {score: value})]
PUBLISHED = {
    ('vggss', 'test'): [
        ('EZ-VSL + OGL [VGGSound-144k]', {'cIoU': 38.85, 'AUC': 39.54}),
        ('FNAC [VGGSound-144k]', {'cIoU': 39.50, 'AUC': 39.66}),
    ],
    ('vggss', 'test_plus_silent'): [
        ('SLAVC [VGGSound-144k]', {'AP': 32.95, 'max-F1': 40.00}),
    ],
    ('flickr_soundnet', 'test'): [
        ('EZ-VSL + OGL [VGGSound-144k]', {'cIoU': 83.94, 'AUC': 63.60}),
    ],
    ('flickr_soundnet', 'test_plus_silent'): [
        ('SLAVC [VGGSound-144k]', {'AP': 51.63, 'max-F1': 59.10}),
    ],
}
# Our result keys for the published score names.
OURS = {'cIoU': 'success', 'AUC': 'auc', 'AP': 'ap', 'max-F1': 'max_f1'}


def comparison_lines(dataset: str, split: str, scores: dict) -> list[str]:
  """Markdown rows 'method | score ...' for `dataset` ('name/config') and split,
  ours (from one pool's `scores`) first; [] when nothing is published."""
  rows = PUBLISHED.get((dataset.split('/')[0], split))
  if not rows:
    return []
  names = list(rows[0][1])
  ours = ' | '.join(f'{scores.get(OURS[n], float("nan")):.2f}' for n in names)
  lines = ['', f'Published on {dataset.split("/")[0]} {split} (each paper\'s own protocol):', '',
           '| method | ' + ' | '.join(names) + ' |', '|' + '---|' * (len(names) + 1),
           f'| this run | {ours} |']
  lines += [f'| {method} | ' + ' | '.join(f'{v[n]:.2f}' for n in names) + ' |'
            for method, v in rows]
  return lines
