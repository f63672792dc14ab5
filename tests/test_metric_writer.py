"""MetricWriter: TensorBoard gets tags it accepts as they are (no renaming
line per metric on the console); metrics.jsonl keeps the metric names."""

import json
import logging

from tensorboardX import summary as tb_summary

from tavlo_jax import run_io

NAMES = ('eval/total/fixed@0.1/ciou', 'eval/per_category/playing guitar/pointing_game',
         'train/loss')


def test_tags_are_what_tensorboard_would_make_of_them():
  for name in NAMES:
    tag = run_io.tensorboard_tag(name)
    assert tb_summary._clean_tag(tag) == tag      # pylint: disable=protected-access
    assert tb_summary._clean_tag(name) == tag     # the same rule, applied once
  assert run_io.tensorboard_tag(NAMES[0]) == 'eval/total/fixed_0.1/ciou'


def test_writer_is_quiet_and_jsonl_keeps_names(tmp_path, caplog):
  writer = run_io.MetricWriter(str(tmp_path), total_steps=1)
  with caplog.at_level(logging.DEBUG):
    writer.scalars(3, {name: 1.5 for name in NAMES})
  writer.close()
  assert 'illegal' not in caplog.text
  row = json.loads((tmp_path / 'metrics.jsonl').read_text())
  assert row == {'step': 3, **{name: 1.5 for name in NAMES}}
