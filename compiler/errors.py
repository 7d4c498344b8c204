"""User-facing errors: one message naming the place and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad user input of any kind: a command-line flag, a database URL, a damaged or foreign file, a resume target,
    data. `where` names the place (a flag, a path, 'file:line'), `what` what is wrong, `fix` what to do; the CLIs
    print it as one message and exit 2 (cli below)."""

    def __init__(self, where: str, what: str, fix: str):
        super().__init__(f'{where}: {what}\n  fix: {fix}')
        self.where, self.what, self.fix = where, what, fix


class SpecError(UserError):
    """A problem in a spec: a file:line, a binding or a plan value the compiler refuses (also a sweep spec's)."""


def either(words) -> str:
    """'a', 'a or b', 'a, b or c': alternatives in a message."""
    words = list(words)
    return ' or '.join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"


def cli(main):
    """Decorate a CLI entry point: UserError (SpecError included) -> message on stderr and exit 2; everything else
    propagates."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)

    return wrapper
