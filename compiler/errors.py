"""User-facing errors: one message naming the place and the fix, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys


class SpecError(Exception):
    """Bad user input (spec, binding, data, resume target). `where` is 'file:line', a binding, or a path."""

    def __init__(self, where: str, what: str, fix: str):
        super().__init__(f'{where}: {what}\n  fix: {fix}')
        self.where, self.what, self.fix = where, what, fix


def either(words) -> str:
    """'a', 'a or b', 'a, b or c': alternatives in a message."""
    words = list(words)
    return ' or '.join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"


def cli(main):
    """Decorate a CLI entry point: SpecError -> message on stderr and exit 2; everything else propagates."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except SpecError as e:
            print(f'error: {e}', file=sys.stderr)
            sys.exit(2)

    return wrapper
