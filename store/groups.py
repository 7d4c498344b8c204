"""`python -m store.runs group KEY [KEY ...]`: runs grouped by config keys (the grid points of a sweep), each metric's
final value as mean ± standard error over the runs of a group (its seeds, when the grid varies Run.seed too).

A KEY is written as a --where key (store/where.py): 'autoencode/Stage.lr', 'Memory.chunks', a macro 'LR', or a
flattened config key 'plan.memory.chunks'. A metric's value of a run is its last logged value (eval metrics: at the
last stage end); the standard error is the sample standard deviation (n - 1) over sqrt(n), none for a group of one.
"""
from __future__ import annotations

import math
import statistics

from compiler.errors import UserError
from store.tables import fmt, num, table
from store.where import Where, same


def group_value(where: Where, run):
    """The run's value of a group key: one value, a tuple where the key reads several (unscoped Stack.d_model), None
    where the run lacks it."""
    vals = where.values(run)
    return None if not vals else vals[0] if len(vals) == 1 or all(same(v, vals[0]) for v in vals) else tuple(vals)


def mean_se(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, standard error) of the finite values; (None, None) without any, stderr None for one."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def groups(runs, keys: list[str], finals: dict[str, dict[str, float]], names: list[str]) -> list[dict]:
    """One document per distinct combination of the keys' values, in first-seen order: {'values': {key: value},
    'runs': [ids], 'seeds': [...], 'metrics': {name: {'mean', 'stderr', 'n'}}}."""
    wheres = [Where(f'{k}=', place=f'group {k}') for k in keys]
    for w in wheres:
        if runs and not any(w.values(r) for r in runs):
            raise UserError(f'group {w.key}', 'no run of this selection has this key',
                            'use Configurable.param (Memory.chunks), a macro of the operative gin (LR), or a key '
                            'that python -m store.runs show ID --keys lists (plan.memory.chunks)')
    out: dict[tuple, dict] = {}
    for r in runs:
        vals = [group_value(w, r) for w in wheres]
        g = out.setdefault(tuple(fmt(v) for v in vals), {'values': dict(zip(keys, vals)), 'runs': [], 'seeds': []})
        g['runs'].append(r.id)
        g['seeds'].append(r.config.get('seed'))
    for g in out.values():
        g['metrics'] = {}
        for n in names:
            xs = [finals.get(i, {}).get(n) for i in g['runs']]
            mean, se = mean_se(xs)
            g['metrics'][n] = {'mean': mean, 'stderr': se, 'n': sum(x is not None and math.isfinite(x) for x in xs)}
    return list(out.values())


def cell(m: dict) -> str:
    if m['mean'] is None:
        return '-'
    return num(m['mean']) + (f" ± {num(m['stderr'])}" if m['stderr'] is not None else '')


def render(docs: list[dict], keys: list[str], names: list[str]) -> str:
    headers = keys + ['runs', 'seeds'] + names
    rows = [[fmt(g['values'][k]) for k in keys] + [str(len(g['runs'])), ','.join(str(s) for s in g['seeds'])]
            + [cell(g['metrics'][n]) for n in names] for g in docs]
    total = sum(len(g['runs']) for g in docs)
    return (f"{total} runs in {len(docs)} groups by {', '.join(keys)} (each metric's final value: mean ± standard "
            'error over the runs of a group)\n' + table(headers, rows, right=set(range(len(keys), len(headers)))))


def csv_rows(docs: list[dict], keys: list[str], names: list[str]) -> tuple[list[str], list[list]]:
    headers = keys + ['runs', 'seeds'] + [f'{n}{s}' for n in names for s in (':mean', ':stderr', ':n')]
    rows = [[g['values'][k] for k in keys] + [' '.join(g['runs']), ' '.join(str(s) for s in g['seeds'])]
            + [g['metrics'][n][f] for n in names for f in ('mean', 'stderr', 'n')] for g in docs]
    return headers, rows
