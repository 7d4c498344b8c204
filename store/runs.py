"""python -m store.runs {list,show,metrics,compare} [--db URL] ...: query the runs that `python -m runtime.run` recorded.

    list                       one line per run: id, spec, status, stages, final eval metrics, start time
                               (--spec SUBSTRING, --status STATUS, --where KEY=VALUE, repeatable); a RUNNING run
                               whose heartbeat stopped shows as 'RUNNING (stale: no heartbeat for 2 h 05 min)'
    show ID                    plan summary, host, run folder, stage-end metrics, evaluations, artifacts, gin
    metrics ID [--name PAT]    every logged value (name, step, value); --csv for CSV, --plot OUT.png for curves
    compare ID ID ...          plan keys, CLI bindings, stage-end metrics and evaluations side by side

The database is Sacred's (SqlObserver tables `run`, `host`, `experiment`, `artifact`, ...) plus our
`memspec_metrics(run_id, name, step, value, time)` table: sqlite:///runs/sacred.db by default, or a PostgreSQL URL;
a mongodb:// URL reads Sacred's MongoObserver collections (needs pymongo). Queries are SQLAlchemy Core text
statements, so SQLite and PostgreSQL run the same code. SQLite files are opened read-only and never created.
"""  # noqa: E501 (the first line is printed verbatim as the --help description)
from __future__ import annotations

import argparse
import csv
import difflib
import fnmatch
import json
import os
import sys
from pathlib import Path

from compiler.errors import SpecError, cli
from store.database import DEFAULT_DB, STALE_AFTER, STATUSES, RunRecord, get_run, latest_evaluations, open_db, span
from store.plots import plot
from store.tables import (
    duration,
    fmt,
    metrics_table,
    num,
    plan_summary,
    spec_label,
    spec_text,
    stage_line,
    table,
    top_specs,
    when,
)
from store.where import Where, bindings

# final eval metrics shown by `list` (column title, metric name)
HEADLINE = [('clm.ce', 'eval/clm.ce'), ('blank_copy acc', 'eval/blank_copy.token_accuracy'),
            ('copy acc', 'eval/copy.token_accuracy'), ('autoencode acc', 'eval/autoencode.token_accuracy')]
# stage-end metrics shown by `compare` unless --name picks others
COMPARE_METRICS = ['clm.ce', 'clm.token_accuracy', 'clm.bits_per_byte', 'copy.token_accuracy',
                   'copy_ablated.token_accuracy', 'blank_copy.token_accuracy', 'blank_copy_ablated.token_accuracy',
                   'autoencode.token_accuracy',
                   'autoencode.info_proportion']


# ------------------------------------------------------------------------------------------------ derived views

def stage_end_metrics(db, run: RunRecord) -> dict[str, dict[str, float]]:
    """stage -> {eval metric (without 'eval/'): value at the stage's last step}. From the metrics table; the
    run's summary.json (artifact, or file in the run folder) where the table has none."""
    ends = run.end_steps
    out: dict[str, dict[str, float]] = {}
    if ends:
        by_step: dict[int, list[str]] = {}
        for stage, step in ends.items():
            by_step.setdefault(step, []).append(stage)
        for name, step, value in db.at_steps(run.id, sorted(by_step)):
            for stage in by_step.get(step, []):
                out.setdefault(stage, {})[name[len('eval/'):]] = value
    if out:
        return {s: out[s] for s in sorted(out, key=lambda s: ends[s])}
    raw = db.artifact(run.id, 'summary.json')
    if raw is None and run.info.get('run_dir'):
        p = Path(run.info['run_dir']) / 'summary.json'
        raw = p.read_bytes() if p.is_file() else None
    try:
        summary = json.loads(raw) if raw else {}
    except ValueError:
        summary = {}
    return {s: {k: float(v) for k, v in m.items()} for s, m in summary.items() if isinstance(m, dict)}


def status_text(run: RunRecord) -> str:
    """The status, with RUNNING flagged when the run's heartbeat stopped: its process died without a word (kill -9,
    power loss), and `python -m runtime.run ... --resume ID` continues it."""
    silent = run.silent_for()
    if silent is not None and silent > STALE_AFTER:
        return f'RUNNING (stale: no heartbeat for {span(silent)})'
    return run.status


# ------------------------------------------------------------------------------------------------ --where

# ------------------------------------------------------------------------------------------------ output

# ------------------------------------------------------------------------------------------------ commands

def cmd_list(db, args) -> None:
    wheres = [Where(w) for w in args.where or []]
    runs = db.runs(status=args.status)
    if args.spec:
        runs = [r for r in runs if any(args.spec in f or args.spec in spec_label(f) for f in r.spec_files)]
    for w in wheres:
        if w.kind != 'gin' and runs and not any(w.values(r) for r in runs):
            raise SpecError(w.place, f"no recorded run has {'macro' if w.kind == 'macro' else 'config key'} '{w.key}'",
                            'use Configurable.param (Memory.chunks), a macro of the operative gin (LR), or a key that '
                            'python -m store.runs show ID --keys lists (plan.memory.chunks)')
        runs = [r for r in runs if w(r)]
    if not runs:
        print('no runs match' if (args.spec or args.status or wheres) else f'no runs in {db.name}', file=sys.stderr)
        return
    finals = db.final_metrics([r.id for r in runs], [n for _, n in HEADLINE])
    for r in runs:  # no metric rows (the recorder lost them, or another observer): the run's summary.json
        if not finals.get(r.id):
            sm = stage_end_metrics(db, r)
            if sm:
                finals[r.id] = {f'eval/{k}': v for k, v in sm[list(sm)[-1]].items()}
    cols = [(t, n) for t, n in HEADLINE if any(n in finals.get(r.id, {}) for r in runs)]
    headers = ['id', 'spec', 'status', 'stages'] + [t for t, _ in cols] + ['started (UTC)']
    rows = []
    for r in runs:
        stages = ','.join(r.stages)
        done = len(r.end_steps)
        if r.status != 'COMPLETED' and r.stages:
            stages += f' ({done}/{len(r.stages)} done)'
        rows.append([r.id, spec_text(r), status_text(r), stages] + [num(finals.get(r.id, {}).get(n)) for _, n in cols]
                    + [when(r.start)])
    print(table(headers, rows, right={0} | set(range(4, 4 + len(cols)))))


def cmd_show(db, args) -> None:
    run = get_run(db, args.id)
    if args.keys:
        for k, v in run.flat.items():
            if k not in ('operative_gin',):
                print(f'{k} = {fmt(v)}')
        return
    cfg, info = run.config, run.info
    print(f"run {run.id}  {status_text(run)}  experiment '{run.experiment or '?'}'  plan {cfg.get('spec_hash', '?')}")
    print(f'started     {when(run.start, True)} UTC'
          + (f'   stopped {when(run.stop, True)} UTC  ({duration(run.start, run.stop)})' if run.stop else ''))
    tops = top_specs(run)
    includes = [spec_label(f) for f in run.spec_files if f not in tops]
    print(f"spec        {', '.join(tops) or '?'}" + (f"   (includes {', '.join(includes)})" if includes else ''))
    if cfg.get('bindings'):
        print('bindings    ' + ' '.join(f'-b {b!r}' if ' ' in b or "'" not in b else f'-b "{b}"'
                                        for b in cfg['bindings']))
    h, hi = run.host, info.get('host') or {}
    pk = hi.get('packages') or {}
    details = [x for x in (h.get('cpu'), h.get('os_info'), f"Python {h.get('python_version') or hi.get('python', '?')}",
                           f"torch {pk['torch']}" if 'torch' in pk else None,
                           f"{hi['threads']} threads" if 'threads' in hi else None) if x]
    print(f"host        {h.get('hostname', '?')}  ({', '.join(details)})")
    run_dir = info.get('run_dir')
    print(f"run folder  {run_dir or '?'}"
          + ('' if not run_dir or Path(run_dir).is_dir() else '  (not on this machine)'))
    data = info.get('data') or {}
    if data:
        st = data.get('stats') or {}
        sizes = ', '.join(f"{k} {v.get('tokens', 0):,} tokens / {v.get('examples', 0):,} examples"
                          for k, v in st.items() if isinstance(v, dict))
        print(f"data        {data.get('cache', '?')}  (vocab {data.get('vocab_size', '?')}"
              + (f'; {sizes}' if sizes else '') + ')')
    if run.result is not None:
        print(f'result      {run.result:.6g}')
    if run.fail_trace:
        last = [ln for ln in str(run.fail_trace).strip().splitlines() if ln.strip()]
        print(f"failure     {last[-1].strip() if last else '?'}")
    print('\nplan')
    for k, v in plan_summary(run.plan):
        print(f'  {k:<11} {v}')
    stages = run.plan.get('curriculum') or []
    if stages:
        print('  curriculum')
        print(table(['stage', 'steps', 'lr', 'objectives', ''], [stage_line(s) for s in stages], right={1, 2},
                    indent='    '))
    sm = stage_end_metrics(db, run)
    print('\nstage-end metrics (eval, at each stage\'s last step)')
    print(metrics_table(sm, run.end_steps) if sm else '  none recorded')
    evals = latest_evaluations(db.evaluations(run.id))
    print('\nevaluations (python -m runtime.evaluate; the newest of each)')
    print(table(['stage', 'memory', 'limit', 'task', 'metric', 'value', 'evaluated (UTC)'],
                [[e.stage, e.memory, '-' if e.limit is None else str(e.limit), e.task, e.metric, num(e.value),
                  when(e.time)] for e in evals], right={2, 5}, indent='  ') if evals else '  none recorded')
    arts = db.artifacts(run.id)
    print('\nartifacts')
    if arts:
        print(table(['name', 'bytes'], [[n, f'{s:,}'] for n, s in arts], right={1}, indent='  '))
    else:
        print('  none recorded')
    print('\noperative gin')
    print('\n'.join('  ' + ln for ln in (cfg.get('operative_gin') or '(not recorded)').rstrip().splitlines()))


def select_metrics(rows, patterns: list[str] | None, run_id: str, place: str = '--name'):
    if not rows:
        raise SpecError(f'run {run_id}', 'no metrics recorded for this run',
                        'metrics live in the memspec_metrics table that python -m runtime.run writes; a run that died '
                        'before its first log step, or one recorded elsewhere, has none')
    if not patterns:
        return rows
    names = sorted({r[0] for r in rows})
    keep = set()
    for p in patterns:
        hits = {n for n in names if (fnmatch.fnmatchcase(n, p) if any(c in p for c in '*?[') else p in n)}
        if not hits:
            close = difflib.get_close_matches(p, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ''
            raise SpecError(f'{place} {p}', f'run {run_id} has no metric matching this',
                            f"{hint}give a substring or glob of one of: {', '.join(names)}")
        keep |= hits
    return [r for r in rows if r[0] in keep]


def cmd_metrics(db, args) -> None:
    run = get_run(db, args.id)
    rows = select_metrics(db.metrics(run.id), args.name, run.id)
    if args.plot:
        plot(rows, run, args.plot)
    elif args.csv:
        w = csv.writer(sys.stdout, lineterminator='\n')
        w.writerow(['name', 'step', 'value'])
        for name, step, value in rows:
            w.writerow([name, step, repr(value)])
    else:
        print(table(['name', 'step', 'value'], [[n, str(s), f'{v:.6g}'] for n, s, v in rows], right={1, 2}))


def cmd_compare(db, args) -> None:
    if len(args.ids) < 2:
        raise SpecError('compare', 'needs at least two run ids', 'e.g. python -m store.runs compare 0 2')
    runs = [get_run(db, i) for i in args.ids]
    tty = sys.stdout.isatty() if args.color == 'auto' else args.color == 'always'
    ids = [r.id for r in runs]
    print(table(['run'] + ids, [['spec'] + [spec_text(r) for r in runs], ['status'] + [r.status for r in runs],
                                ['plan hash'] + [str(r.config.get('spec_hash', '?')) for r in runs]], tty=tty))

    def diff_rows(values: dict[str, list], show_all: bool):
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

    plan_keys = list(dict.fromkeys(k for r in runs for k in r.flat if k.startswith('plan.')))
    values = {k: [r.flat.get(k, _MISSING) for r in runs] for k in plan_keys}
    ndiff = sum(1 for v in values.values() if len({fmt(x) if x is not _MISSING else '-' for x in v}) > 1)
    rows, marked = diff_rows(collapse_missing(values, runs), args.all)
    note = 'bold' if tty else '*'
    print(f'\nplan: {ndiff} of {len(plan_keys)} keys differ ({note}: differs from run {ids[0]})')
    if rows:
        print(table(['key'] + ids, rows, marked=marked, tty=tty, indent='  '))
    bs = [bindings(r) for r in runs]
    bkeys = list(dict.fromkeys(k for b in bs for k in b))
    brows, bmarked = diff_rows({k: [b.get(k, _MISSING) for b in bs] for k in bkeys}, False)
    print('\ncommand-line bindings that differ' + ('' if brows else ': none'))
    if brows:
        print(table(['binding'] + ids, brows, marked=bmarked, tty=tty, indent='  '))
    sms = [stage_end_metrics(db, r) for r in runs]
    stages = list(dict.fromkeys(s for sm in sms for s in sm))
    names = sorted({n for sm in sms for m in sm.values() for n in m})
    if args.name:
        pick = []
        for p in args.name:
            hits = [n for n in names if (fnmatch.fnmatchcase(n, p) if any(c in p for c in '*?[') else p in n)]
            if not hits:
                raise SpecError(f'--name {p}', 'no stage-end metric of these runs matches this',
                                f"known: {', '.join(names) or 'none recorded'}")
            pick += hits
        names = list(dict.fromkeys(pick))
    else:
        names = [n for n in COMPARE_METRICS if n in names]
    mrows = [[s, n] + [num(sm.get(s, {}).get(n)) for sm in sms] for s in stages for n in names
             if any(n in sm.get(s, {}) for sm in sms)]
    print('\nstage-end metrics' + ('' if mrows else ': none recorded'))
    if mrows:
        print(table(['stage', 'metric'] + ids, mrows, right=set(range(2, 2 + len(ids))), indent='  '))
    evals = [{(e.task, e.metric, e.stage, e.memory, e.limit): e.value for e in latest_evaluations(db.evaluations(i))}
             for i in ids]
    keys = list(dict.fromkeys(k for ev in evals for k in ev))
    print('\nevaluations (python -m runtime.evaluate)' + ('' if keys else ': none recorded'))
    if keys:
        erows = [[t, m, f"{st}/{mem}" + ('' if lim is None else f'/limit {lim}')] + [num(ev.get(k)) for ev in evals]
                 for k in keys for t, m, st, mem, lim in [k]]
        print(table(['task', 'metric', 'stage/memory'] + ids, erows, right=set(range(3, 3 + len(ids))),
                    indent='  '))


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


# ------------------------------------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--db', default=DEFAULT_DB, metavar='URL',
                        help=f'run database: sqlite:///path.db, postgresql://user:pw@host/db or mongodb://host '
                             f'(default {DEFAULT_DB})')
    ap = argparse.ArgumentParser(prog='python -m store.runs', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n')[1])
    sub = ap.add_subparsers(dest='command', required=True, metavar='{list,show,metrics,compare}')
    p = sub.add_parser('list', parents=[common], help='one line per run')
    p.add_argument('--spec', metavar='SUBSTRING', help='only runs whose spec file paths contain this')
    p.add_argument('--status', type=str.upper, choices=STATUSES, help='only runs with this status')
    p.add_argument('--where', action='append', metavar='KEY=VALUE',
                   help="plan filter, repeatable (all must hold): 'Memory.chunks=4', 'encoder/Stack.d_model=128', "
                        "'blank/Stage.lr=1e-3', a macro 'LR=1e-3', or a flattened key 'plan.memory.chunks=4'; "
                        "'!=' negates")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser('show', parents=[common], help='one run in full')
    p.add_argument('id')
    p.add_argument('--keys', action='store_true',
                   help='print the flattened config keys (what --where and compare read)')
    p.set_defaults(func=cmd_show)
    p = sub.add_parser('metrics', parents=[common], help="one run's logged metrics")
    p.add_argument('id')
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help="metric names containing this (or matching a glob such as 'eval/*accuracy'); repeatable")
    out = p.add_mutually_exclusive_group()
    out.add_argument('--csv', action='store_true', help='CSV (name,step,value) on stdout')
    out.add_argument('--plot', metavar='OUT.png', help='plot one curve per metric, dashed lines at stage ends')
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser('compare', parents=[common], help='what differs between runs')
    p.add_argument('ids', nargs='+', metavar='ID')
    p.add_argument('--all', action='store_true', help='list every plan key, not only those that differ')
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help='stage-end metrics to compare (default: headline)')
    p.add_argument('--color', choices=('auto', 'always', 'never'), default='auto',
                   help='bold differing values (auto: when stdout is a terminal; otherwise they get a *)')
    p.set_defaults(func=cmd_compare)
    return ap


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    db = open_db(args.db)
    try:
        args.func(db, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == '__main__':
    main()
