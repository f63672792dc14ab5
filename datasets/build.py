"""`tfds build` without TensorFlow: `python -m tavlo_datasets.build ...`.

The `tfds` command itself imports TensorFlow at start-up (its `convert_format`
sub-command does), so it fails in our TF-free install. This runs the very same
`build` command (TFDS's own argument dataclass and code), with our builders
registered. Every `tfds build` flag works, e.g.:

  python -m tavlo_datasets.build avatar --manual_dir=/data/AVATAR \\
      --data_dir=./data/tfds --file_format=array_record

  python -m tavlo_datasets.build vggss --manual_dir=/data/vggss \\
      --data_dir=./data/tfds --file_format=array_record

  python -m tavlo_datasets.build vggsound --config=10k \\
      --manual_dir=/data/vggsound --data_dir=./data/tfds \\
      --file_format=array_record \\
      --beam_pipeline_options=runner=DirectRunner,direct_num_workers=8,direct_running_mode=multi_processing
"""

from __future__ import annotations

import sys

from absl import logging
import simple_parsing
from tensorflow_datasets.scripts.cli import build as tfds_build

from tavlo_datasets.robustness import BadExample

# Registered for `--imports`, so TFDS never looks for a same-named folder in
# the current directory instead.
BUILDER_MODULES = ('tavlo_datasets.avatar', 'tavlo_datasets.vggsound',
                   'tavlo_datasets.vggss', 'tavlo_datasets.flickr_soundnet')


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a.startswith(('--imports', '-i', '--module_import'))
             for a in argv):
    argv.append('--imports=' + ','.join(BUILDER_MODULES))
  logging.set_verbosity(logging.INFO)
  args = simple_parsing.parse(tfds_build.Args, args=argv)
  try:
    args.execute()
  except (FileNotFoundError, BadExample) as e:
    _fail(str(e))
  except AssertionError as e:   # TFDS's check of --manual_dir is an assert
    if not str(e).startswith('Manual directory'):
      raise
    _fail(str(e))


def _fail(message: str) -> None:
  """A user's input error: the message (it names the file and the expected
  layout) without a traceback, exit code 2."""
  first, *rest = message.strip().splitlines() or ['']
  print(f'error: {first}', *rest, sep='\n', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  main()
