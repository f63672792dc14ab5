"""Every command the project prints for users parses.

The commands are read from the documents at test time (README.md,
WORKSPACE.md, docs/, config docstrings, launch/ and the CLIs' own
docstrings), so a rewritten document is checked as it stands: for each
`python -m tavlo_jax...` / `python -m tavlo_datasets...` line (and the
launch scripts, which pass their flags to `tavlo_jax.main`), every `--flag`
must be one the program defines, a `--config=file:variants` must load, and a
`--config.x=v` must name an existing field with a value of its type.
"""

import dataclasses
import functools
import glob
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tavlo_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # one `--helpfull` subprocess per program

DOCUMENTS = ('README.md', 'WORKSPACE.md', 'docs/**/*.md', 'configs/*.py',
             'launch/*', 'tavlo_jax/**/*.py', 'datasets/**/*.py')
# Launch scripts hand their arguments to the main job.
LAUNCHERS = {'launch/slurm_gpu.sbatch': 'tavlo_jax.main',
             'launch/tpu_pod.sh': 'tavlo_jax.main',
             'launch/local_multiprocess.sh': 'tavlo_jax.main'}
# Programs whose --config is a config file (ml_collections config_flags).
CONFIG_FILE_PROGRAMS = ('tavlo_jax.main', 'tavlo_jax.aot_compile',
                        'tavlo_jax.param_count')
COMMAND = re.compile(r'python -m ((?:tavlo_jax|tavlo_datasets)[\w.]*)|'
                     + '|'.join(re.escape(k) for k in LAUNCHERS))
SHELL_ENDS = ('|', '||', '&&', ';', '>', '2>&1', '&')
PLACEHOLDER = re.compile(r'<|\.\.\.|\$')   # `--config=...`, `--workdir=<run>`, `$X`


@dataclasses.dataclass
class Command:
  source: str         # file:line
  program: str        # module run by `python -m`
  flags: list[tuple[str, str | None]]   # (name, value or None)

  def __str__(self):
    return f'{self.source}: python -m {self.program} ' + ' '.join(
        f'--{n}' + ('' if v is None else f'={v}') for n, v in self.flags)


def _logical_lines(text: str):
  """(line number, text) with backslash continuations joined; comment marks
  of shell scripts and docstring prompts are dropped from continued lines."""
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    start, line = i + 1, lines[i].rstrip()
    while re.search(r'\\\\?$', line) and i + 1 < len(lines):
      i += 1
      line = re.sub(r'\s*\\\\?$', ' ', line) + re.sub(r'^\s*#?\s*', '', lines[i]).rstrip()
    yield start, line
    i += 1


def _parse(source: str, program: str, rest: str) -> Command:
  rest = rest.split('`')[0]
  try:
    tokens = shlex.split(rest, comments=False)
  except ValueError:            # an unbalanced quote in prose: take the words
    tokens = rest.split()
  flags = []
  for token in tokens:
    if token in SHELL_ENDS or token.startswith(('>', '|')):
      break
    token = token.strip('[]')
    if not token.startswith('--') or token == '--':
      continue
    name, eq, value = token[2:].partition('=')
    flags.append((name, value if eq else None))
  return Command(source, program, flags)


def documented_commands() -> list[Command]:
  commands = []
  for pattern in DOCUMENTS:
    for path in sorted(glob.glob(str(ROOT / pattern), recursive=True)):
      rel = os.path.relpath(path, ROOT)
      if rel.startswith('tests') or not os.path.isfile(path):
        continue
      text = pathlib.Path(path).read_text(errors='replace')
      for number, line in _logical_lines(text):
        for m in COMMAND.finditer(line):
          program = m.group(1) or LAUNCHERS[m.group(0)]
          rest = line[m.end():]
          nxt = COMMAND.search(rest)
          commands.append(_parse(f'{rel}:{number}', program,
                                 rest[:nxt.start()] if nxt else rest))
  return commands


@functools.cache
def defined_flags(program: str) -> frozenset[str]:
  """Long options a program accepts, from its own help text."""
  helpflag = '--helpfull'
  if program in ('tavlo_datasets.build', 'tavlo_jax.models.convert_torch'):
    helpflag = '--help'     # argparse-based
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', program, helpflag], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  text = r.stdout + r.stderr
  names = set(re.findall(r'^\s*--(?:\[no\])?([\w.-]+)', text, flags=re.M))
  names |= set(re.findall(r'[\s,]--([\w-]+)', text)) if helpflag == '--help' else set()
  assert names, f'{program} {helpflag} listed no flags:\n{text[-2000:]}'
  return frozenset(names)


def _problems(command: Command) -> list[str]:
  problems = []
  known = defined_flags(command.program)
  config = placeholder = None
  for name, value in command.flags:
    if name == 'config' and command.program in CONFIG_FILE_PROGRAMS:
      if PLACEHOLDER.search(value or ''):
        placeholder = value       # a stand-in for the reader's own config
        continue
      try:
        config = config_lib.load_config_file(os.path.join(ROOT, value or ''))
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f'--config={value}: {e}')
    elif name.startswith('config.') and command.program in CONFIG_FILE_PROGRAMS:
      continue                 # checked against the loaded config below
    elif name.removeprefix('no') not in known and name not in known:
      problems.append(f'--{name}: not a flag of {command.program}')
  for name, value in command.flags:
    if not name.startswith('config.') or command.program not in CONFIG_FILE_PROGRAMS:
      continue
    if config is None and placeholder is None:
      problems.append(f'--{name} without a loadable --config')
      continue
    key = name[len('config.'):]
    if config is None:
      continue
    if key not in config_lib.flatten_keys(config):
      problems.append(f'--{name}: no such config field')
    elif value is not None and not PLACEHOLDER.search(value):
      try:
        config_lib.check_override_type(config, key, value)
      except (TypeError, ValueError) as e:
        problems.append(f'--{name}={value}: {e}')
  return problems


def test_the_documents_print_commands():
  programs = {c.program for c in documented_commands()}
  assert {'tavlo_jax.main', 'tavlo_datasets.build'} <= programs, programs


def test_every_documented_command_parses():
  bad = [f'{c}\n    ' + '; '.join(p) for c in documented_commands()
         if (p := _problems(c))]
  assert not bad, 'commands in the documents that would not run:\n' + '\n'.join(bad)


def test_the_checker_catches_what_it_should():
  flags = lambda text: _problems(_parse('x', 'tavlo_jax.main', text))
  assert flags('--config=configs/paper.py:real+runlocal --workdir=/w') == []
  assert 'configs/avatar.py' in flags('--config=configs/avatar.py --workdir=/w')[0]
  assert 'unknown config variant' in flags('--config=configs/paper.py:rael')[0]
  assert 'no such config field' in flags(
      '--config=configs/paper.py --config.model.visual.init=x')[0]
  assert 'expected an int' in flags(
      '--config=configs/paper.py --config.train.total_steps=ten')[0]
  assert 'not a flag' in flags('--config=configs/paper.py --work_dir=/w')[0]
  lines = dict(_logical_lines('a \\\n#   --b=1\nc'))
  assert lines[1] == 'a --b=1'
