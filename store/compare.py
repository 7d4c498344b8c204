"""`python -m store.runs compare RUN RUN ...`: what differs between runs: plan keys (a section absent from some runs
collapsed to one row), command-line bindings, stage-end metrics and evaluations; as text (differences bold on a
terminal, else marked *), or every value exact with --json / --csv."""
from __future__ import annotations

import fnmatch
import sys

from compiler.errors import UserError
from store.database import RunRecord, latest_evaluations
from store.runref import record_of
from store.tables import fmt, num, print_csv, print_json, spec_text, table
from store.views import stage_end_metrics
from store.where import bindings

# stage-end metrics shown by `compare` unless --name picks others
COMPARE_METRICS = ['clm.ce', 'clm.token_accuracy', 'clm.bits_per_byte', 'copy.token_accuracy',
                   'copy_ablated.token_accuracy', 'blank_copy.token_accuracy', 'blank_copy_ablated.token_accuracy',
                   'autoencode.token_accuracy',
                   'autoencode.info_proportion']


def cmd_compare(db, args) -> None:
    if len(args.ids) < 2:
        raise UserError('compare', 'needs at least two run ids', 'e.g. python -m store.runs compare 0 2')
    runs = [record_of(db, i) for i in args.ids]
    if args.json or args.csv:
        compare_document(db, runs, args)
        return
    tty = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
    ids = [r.id for r in runs]
    print(table(['run'] + ids, [['spec'] + [spec_text(r) for r in runs], ['status'] + [r.status for r in runs],
                                ['plan hash'] + [str(r.config.get('spec_hash', '?')) for r in runs]], tty=tty))

    plan_keys = list(dict.fromkeys(k for r in runs for k in r.flat if k.startswith('plan.')))
    values = {k: [r.flat.get(k, _MISSING) for r in runs] for k in plan_keys}
    ndiff = sum(1 for v in values.values() if len({fmt(x) if x is not _MISSING else '-' for x in v}) > 1)
    rows, marked = _diff_rows(collapse_missing(values, runs), args.all)
    note = 'bold' if tty else '*'
    print(f'\nplan: {ndiff} of {len(plan_keys)} keys differ ({note}: differs from run {ids[0]})')
    if rows:
        print(table(['key'] + ids, rows, marked=marked, tty=tty, indent='  '))
    bs = [bindings(r) for r in runs]
    bkeys = list(dict.fromkeys(k for b in bs for k in b))
    brows, bmarked = _diff_rows({k: [b.get(k, _MISSING) for b in bs] for k in bkeys}, False)
    print('\ncommand-line bindings that differ' + ('' if brows else ': none'))
    if brows:
        print(table(['binding'] + ids, brows, marked=bmarked, tty=tty, indent='  '))
    _compare_results(db, runs, ids, args.name)


def _diff_rows(values: dict[str, list], show_all: bool):
    """Table rows of the keys whose values differ between runs (all keys: show_all) and the cells to mark."""
    rows, marked = [], set()
    for key, vals in values.items():
        texts = [fmt(v) if v is not _MISSING else '-' for v in vals]
        differs = len(set(texts)) > 1
        if not differs and not show_all:
            continue
        i = len(rows)
        rows.append([key] + texts)
        marked |= {(i, j + 1) for j, t in enumerate(texts) if j and t != texts[0]}
        if differs and show_all:
            marked.add((i, 0))
    return rows, marked


def _compare_results(db, runs: list[RunRecord], ids: list, names: list[str] | None) -> None:
    sms, stages, names = compared_metrics(db, runs, names)
    mrows = [[s, n] + [num(sm.get(s, {}).get(n)) for sm in sms] for s in stages for n in names
             if any(n in sm.get(s, {}) for sm in sms)]
    print('\nstage-end metrics' + ('' if mrows else ': none recorded'))
    if mrows:
        print(table(['stage', 'metric'] + ids, mrows, right=set(range(2, 2 + len(ids))), indent='  '))
    keys, evals = compared_evaluations(db, ids)
    print('\nevaluations (python -m runtime.evaluate)' + ('' if keys else ': none recorded'))
    if keys:
        erows = [[k[0], k[1], evaluated_as(k)] + [num(ev.get(k)) for ev in evals] for k in keys]
        print(table(['task', 'metric', 'stage/memory'] + ids, erows, right=set(range(3, 3 + len(ids))),
                    indent='  '))


def compared_metrics(db, runs: list[RunRecord], patterns: list[str] | None):
    """(stage-end metrics of each run, the stages, the metric names compare shows: headline or --name)."""
    sms = [stage_end_metrics(db, r) for r in runs]
    stages = list(dict.fromkeys(s for sm in sms for s in sm))
    names = sorted({n for sm in sms for m in sm.values() for n in m})
    if patterns:
        pick = []
        for p in patterns:
            hits = [n for n in names if (fnmatch.fnmatchcase(n, p) if any(c in p for c in '*?[') else p in n)]
            if not hits:
                raise UserError(f'--name {p}', 'no stage-end metric of these runs matches this',
                                f"known: {', '.join(names) or 'none recorded'}")
            pick += hits
        names = list(dict.fromkeys(pick))
    else:
        names = [n for n in COMPARE_METRICS if n in names]
    return sms, stages, names


def compared_evaluations(db, ids: list) -> tuple[list, list[dict]]:
    """(keys (task, metric, stage, memory, limit) in first-seen order, each run's newest value per key)."""
    evals = [{(e.task, e.metric, e.stage, e.memory, e.limit): e.value for e in latest_evaluations(db.evaluations(i))}
             for i in ids]
    return list(dict.fromkeys(k for ev in evals for k in ev)), evals


def evaluated_as(key: tuple) -> str:
    """'stage/memory[/limit N]' of an evaluation key (task, metric, stage, memory, limit)."""
    _, _, stage, memory, limit = key
    return f'{stage}/{memory}' + ('' if limit is None else f'/limit {limit}')


def compare_document(db, runs: list[RunRecord], args) -> None:
    """compare --json / --csv: the same sections as the text (plan keys that differ, or all with --all; command-line
    bindings that differ; stage-end metrics; evaluations), every value exact; a run that lacks a key has null."""
    ids = [r.id for r in runs]
    plan_keys = list(dict.fromkeys(k for r in runs for k in r.flat if k.startswith('plan.')))
    plan = {k: [r.flat.get(k) for r in runs] for k in plan_keys}
    plan = {k: v for k, v in plan.items() if args.all or len({fmt(x) for x in v}) > 1}
    bs = [bindings(r) for r in runs]
    binds = {k: [b.get(k) for b in bs] for k in dict.fromkeys(k for b in bs for k in b)}
    binds = {k: v for k, v in binds.items() if len(set(map(str, v))) > 1}
    sms, stages, names = compared_metrics(db, runs, args.name)
    metrics = {s: {n: [sm.get(s, {}).get(n) for sm in sms] for n in names if any(n in sm.get(s, {}) for sm in sms)}
               for s in stages}
    keys, evals = compared_evaluations(db, ids)
    if args.json:
        print_json({'runs': [{'id': r.id, 'name': r.name, 'spec': spec_text(r), 'status': r.status,
                              'spec_hash': r.config.get('spec_hash')} for r in runs],
                    'plan': plan, 'bindings': binds, 'stage_end_metrics': metrics,
                    'evaluations': [{'task': t, 'metric': m, 'stage': st, 'memory': mem, 'limit': lim,
                                     'values': [ev.get(k) for ev in evals]}
                                    for k in keys for t, m, st, mem, lim in [k]]})
        return
    rows = [['plan', k, '', *v] for k, v in plan.items()] + [['binding', k, '', *v] for k, v in binds.items()] \
        + [['stage_end_metric', n, s, *v] for s, m in metrics.items() for n, v in m.items()] \
        + [['evaluation', f'{k[0]}/{k[1]}', evaluated_as(k), *[ev.get(k) for ev in evals]] for k in keys]
    print_csv(['section', 'key', 'stage', *ids], rows)


_MISSING = object()


def _missing_prefix(key: str, run: RunRecord) -> str:
    """The shortest prefix of `key` (at dots) that `run`'s config lacks entirely, e.g. a whole stage."""
    parts = key.split('.')
    for i in range(2, len(parts) + 1):
        prefix = '.'.join(parts[:i])
        if prefix not in run.flat and not any(k.startswith(prefix + '.') for k in run.flat):
            return prefix
    return key


def collapse_missing(values: dict[str, list], runs: list[RunRecord]) -> dict[str, list]:
    """Keys that differ only because a whole section (a stage, an encoder) is absent from some runs become one
    'section.*' row ('present' / '-'); keys whose values differ among the runs that have them stay."""
    out: dict[str, list] = {}
    for key, vals in values.items():
        present = {fmt(v) for v in vals if v is not _MISSING}
        absent = [j for j, v in enumerate(vals) if v is _MISSING]
        if len(present) > 1 or not absent:
            out[key] = vals
            continue
        prefixes = {_missing_prefix(key, runs[j]) for j in absent}
        prefix = min(prefixes, key=len)
        if prefix == key:
            out[key] = vals
        else:
            out.setdefault(prefix + '.*', ['present' if v is not _MISSING else _MISSING for v in vals])
    return out
