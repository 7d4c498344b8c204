"""The argument parser of every memspec CLI: numbers are range-checked where argparse reads them, and a misspelled
choice or subcommand gets a 'did you mean'. Both end in argparse's one-line `error:` message and exit 2, before any
work starts; no number that cannot mean anything (nan, inf, a negative count, 10**12 documents) reaches the code.

    ap = Parser(prog='python -m runtime.generate')
    ap.add_argument('--temperature', type=real(0, 100), default=0.0)
    ap.add_argument('--limit', type=integer(1, MANY))
"""
from __future__ import annotations

import argparse
import difflib
import math

MANY = 10 ** 9  # the most of anything countable a CLI accepts (documents, rows, queries, points)
SEED = 2 ** 63 - 1  # torch.manual_seed and numpy's generators take any seed in 0..2**63-1


def suggestion(value, choices) -> str:
    """"; did you mean 'x'?" for the choice closest to `value`, or ''."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ''


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose choice errors (options and subcommands) suggest the closest choice. Subparsers
    made by add_subparsers().add_parser are of this class too (argparse makes them of the parent's class)."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            choices = ', '.join(repr(str(c)) for c in action.choices)
            raise argparse.ArgumentError(action, f'invalid choice: {str(value)!r} (choose from {choices})'
                                         f'{suggestion(value, action.choices)}')


def _bounds(lo, hi) -> str:
    if hi is None:
        return f'at least {lo}'
    return f'between {lo} and {hi}' if lo is not None else f'at most {hi}'


def integer(lo: int | None = 0, hi: int | None = MANY):
    """An argparse type: an integer in [lo, hi] (None: unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f'{text} is out of range: give an integer {_bounds(lo, hi)}')
        return v
    parse.__name__ = 'integer'
    return parse


def real(lo: float | None = 0.0, hi: float | None = None, above: bool = False):
    """An argparse type: a finite number in [lo, hi] (`above`: strictly greater than lo)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f'{text} is not a finite number')
        if lo is not None and (v < lo or (above and v == lo)):
            raise argparse.ArgumentTypeError(f'{text} is out of range: give a number '
                                             + (f'above {lo:g}' if above else _bounds(f'{lo:g}', hi and f'{hi:g}')))
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f'{text} is out of range: give a number at most {hi:g}')
        return v
    parse.__name__ = 'number'
    return parse
