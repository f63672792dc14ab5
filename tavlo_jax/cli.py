"""How every command-line tool answers a user's mistake: one line per bad
input on stderr (`error: <file>: <key>: <what was expected>`), exit code 2,
no traceback. Bugs (anything not listed as a user error) still raise.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, NoReturn

from absl import app

EXIT_USAGE = 2


class InputError(ValueError):
  """Bad user input; each entry of `lines` is one complete message."""

  def __init__(self, *lines: str):
    super().__init__('\n'.join(lines))
    self.lines = list(lines)


def fail(*lines: str) -> NoReturn:
  for line in lines:
    print(f'error: {line}', file=sys.stderr)
  sys.exit(EXIT_USAGE)


def user_errors(*errors: type[BaseException]) -> Callable:
  """Decorates a CLI's `main(argv)`: `InputError`, absl's `UsageError` (a
  missing or contradictory flag) and the given exception types become
  `fail` lines instead of tracebacks (absl would print the whole usage text
  for a UsageError, burying the one line that matters)."""
  caught = (InputError, app.UsageError) + tuple(errors)

  def wrap(main):
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
      try:
        return main(*args, **kwargs)
      except caught as e:   # pylint: disable=catching-non-exception
        fail(*(getattr(e, 'lines', None) or str(e).strip().splitlines()[:1]
               or [type(e).__name__]))
    return wrapped
  return wrap
