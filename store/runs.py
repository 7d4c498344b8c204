"""python -m store.runs {list,show,metrics,compare} [--db URL] ...: query the runs that `python -m runtime.run` recorded.

    list                       one line per run: id, spec, status, stages, final eval metrics, start time
                               (--spec SUBSTRING, --status STATUS, --where KEY=VALUE, repeatable); a RUNNING run
                               whose heartbeat stopped shows as 'RUNNING (stale: no heartbeat for 2 h 05 min)'
    show RUN                   plan summary, host, provenance, run folder, weights, artifacts, stage-end metrics,
                               evaluations, operative gin
    metrics RUN [RUN ...]      every logged value (run, name, step, value; --name PAT); --plot OUT.png overlays the
                               runs, one panel per metric kind (store/plots.py)
    compare RUN RUN ...        plan keys, CLI bindings, stage-end metrics and evaluations that differ between runs

RUN is a run id, its full name <id>-<key>, or its run folder's path (store/runref.py). Every command also prints
--json (one JSON document) or --csv (one table) instead of text.

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
import math
import os
import sys
from pathlib import Path

from compiler.errors import UserError, cli
from store.database import (
    DEFAULT_DB,
    STALE_AFTER,
    STATUSES,
    RunRecord,
    flatten,
    latest_evaluations,
    open_db,
    span,
)
from store.plots import Series, curves
from store.runref import database_for, record_of
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
    if run.damaged:  # listed, so it can be found; commands that read the whole run refuse it (RunRecord.check)
        return f"{run.status[:20]} (damaged: {', '.join(d.split(' (')[0] for d in run.damaged)})"
    silent = run.silent_for()
    if silent is not None and silent > STALE_AFTER:
        return f'RUNNING (stale: no heartbeat for {span(silent)})'
    return run.status


# ------------------------------------------------------------------------------------------------ output

def _plain(v):
    """A value as JSON holds it: non-finite floats become null (JSON has no NaN), datetimes ISO text."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, 'isoformat'):
        return v.isoformat()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def print_json(doc) -> None:
    print(json.dumps(_plain(doc), indent=1))


def print_csv(headers: list[str], rows: list[list]) -> None:
    """Exact values: floats as repr (round-trip), None as an empty cell, lists and dicts as JSON."""
    def cell(v):
        if v is None:
            return ''
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, (list, dict)):
            return json.dumps(_plain(v))
        return v.isoformat() if hasattr(v, 'isoformat') else str(v)
    w = csv.writer(sys.stdout, lineterminator='\n')
    w.writerow(headers)
    for r in rows:
        w.writerow([cell(v) for v in r])


# ------------------------------------------------------------------------------------------------ commands

def _listed(db, args, wheres: list[Where]) -> list[RunRecord]:
    """The runs --status, --spec and every --where select."""
    runs = db.runs(status=args.status)
    if args.spec:
        runs = [r for r in runs if any(args.spec in f or args.spec in spec_label(f) for f in r.spec_files)]
    for w in wheres:
        if w.kind != 'gin' and runs and not any(w.values(r) for r in runs):
            raise UserError(w.place, f"no recorded run has {'macro' if w.kind == 'macro' else 'config key'} '{w.key}'",
                            'use Configurable.param (Memory.chunks), a macro of the operative gin (LR), or a key that '
                            'python -m store.runs show ID --keys lists (plan.memory.chunks)')
        runs = [r for r in runs if w(r)]
    return runs


def _headline(db, runs: list[RunRecord]) -> dict[str, dict[str, float]]:
    """Final eval metrics per run (no metric rows, e.g. another observer: its summary.json's last stage)."""
    finals = db.final_metrics([r.id for r in runs], [n for _, n in HEADLINE])
    for r in runs:
        if not finals.get(r.id):
            sm = stage_end_metrics(db, r)
            if sm:
                finals[r.id] = {f'eval/{k}': v for k, v in sm[list(sm)[-1]].items()}
    return finals


def cmd_list(db, args) -> None:
    wheres = [Where(w) for w in args.where or []]
    runs = _listed(db, args, wheres)
    if not runs:
        print('no runs match' if (args.spec or args.status or wheres) else f'no runs in {db.name}', file=sys.stderr)
        return
    finals = _headline(db, runs)
    cols = [(t, n) for t, n in HEADLINE if any(n in finals.get(r.id, {}) for r in runs)]
    headers = ['id', 'spec', 'status', 'stages'] + [t for t, _ in cols] + ['started (UTC)']
    if args.json or args.csv:
        docs = [{'id': r.id, 'name': r.name, 'spec': spec_text(r), 'status': status_text(r), 'stages': r.stages,
                 'stages_done': len(r.end_steps), **{n: finals.get(r.id, {}).get(n) for _, n in cols},
                 'started': r.start} for r in runs]
        if args.json:
            print_json(docs)
        else:
            print_csv(list(docs[0]), [list(d.values()) for d in docs])
        return
    rows = []
    for r in runs:
        stages = ','.join(r.stages)
        done = len(r.end_steps)
        if r.status != 'COMPLETED' and r.stages:
            stages += f' ({done}/{len(r.stages)} done)'
        rows.append([r.id, spec_text(r), status_text(r), stages] + [num(finals.get(r.id, {}).get(n)) for _, n in cols]
                    + [when(r.start)])
    print(table(headers, rows, right={0} | set(range(4, 4 + len(cols)))))


def show_document(db, run: RunRecord) -> dict:
    """Everything `show` prints, as one JSON-able document."""
    cfg, info = run.config, run.info
    return {'id': run.id, 'name': run.name, 'status': status_text(run), 'experiment': run.experiment,
            'spec_hash': cfg.get('spec_hash'), 'started': run.start, 'stopped': run.stop, 'spec': top_specs(run),
            'spec_files': run.spec_files, 'bindings': cfg.get('bindings') or [], 'seed': cfg.get('seed'),
            'host': {**run.host, **(info.get('host') or {})}, 'run_dir': info.get('run_dir'),
            'data': info.get('data') or {}, 'result': run.result, 'fail_trace': run.fail_trace,
            'provenance': cfg.get('provenance') or {}, 'resumes': info.get('resumes') or [],
            'weights': info.get('weights') or {}, 'plan': run.plan, 'end_steps': run.end_steps,
            'stage_end_metrics': stage_end_metrics(db, run),
            'evaluations': [{'stage': e.stage, 'memory': e.memory, 'limit': e.limit, 'task': e.task, 'metric': e.metric,
                             'value': e.value, 'time': e.time} for e in latest_evaluations(db.evaluations(run.id))],
            'artifacts': [{'name': n, 'bytes': b} for n, b in db.artifacts(run.id)],
            'operative_gin': cfg.get('operative_gin')}


def code_line(code: dict) -> str:
    """The provenance of a run's code in one line (runtime/provenance.py records it)."""
    if code.get('kind') == 'git':
        # runs recorded before 'dirty' meant "the diff is not empty" were also dirty for untracked files alone
        dirty = (f"dirty: {code.get('diff_bytes', 0):,} bytes of diff (sha256 {str(code.get('diff_sha256'))[:12]})"
                 if code.get('dirty') and code.get('diff_bytes') else 'clean')
        files = [f.get('path', '?') for f in code.get('untracked') or [] if isinstance(f, dict)]
        if files:
            more = len(files) - 5 + int(code.get('untracked_more') or 0)
            dirty += f", untracked files hashed: {', '.join(files[:5])}" + (f' and {more} more' if more > 0 else '')
        return f"git {str(code.get('commit'))[:12]} on {code.get('branch', '?')}, {dirty}"
    if code.get('kind') == 'tree':
        return f"source tree sha256 {str(code.get('sha256'))[:12]} ({code.get('files')} files; not a git checkout)"
    return 'not recorded'


def cmd_show(db, args) -> None:
    run = record_of(db, args.id)
    if args.keys:
        for k, v in run.flat.items():
            if k not in ('operative_gin',):
                print(f'{k} = {fmt(v)}')
    elif args.json:
        print_json(show_document(db, run))
    elif args.csv:
        print_csv(['key', 'value'], [[k, v] for k, v in flatten(_plain(show_document(db, run))).items()])
    else:
        for part in (_show_origin, _show_host, _show_folder, _show_plan, _show_metrics, _show_weights):
            part(db, run)
        print('\noperative gin')
        gin = run.config.get('operative_gin') or '(not recorded)'
        print('\n'.join('  ' + ln for ln in gin.rstrip().splitlines()))


def _show_origin(db, run: RunRecord) -> None:
    """Status, times, spec files and bindings."""
    cfg = run.config
    print(f"run {run.id}  {status_text(run)}  experiment '{run.experiment or '?'}'  plan {cfg.get('spec_hash', '?')}")
    print(f'started     {when(run.start, True)} UTC'
          + (f'   stopped {when(run.stop, True)} UTC  ({duration(run.start, run.stop)})' if run.stop else ''))
    tops = top_specs(run)
    includes = [spec_label(f) for f in run.spec_files if f not in tops]
    print(f"spec        {', '.join(tops) or '?'}" + (f"   (includes {', '.join(includes)})" if includes else ''))
    if cfg.get('bindings'):
        print('bindings    ' + ' '.join(f'-b {b!r}' if ' ' in b or "'" not in b else f'-b "{b}"'
                                        for b in cfg['bindings']))


def _show_host(db, run: RunRecord) -> None:
    """The machine, the code (and every resume's), the init_from sources."""
    cfg, info = run.config, run.info
    h, hi = run.host, info.get('host') or {}
    pk = hi.get('packages') or {}
    details = [x for x in (h.get('cpu'), h.get('os_info'), f"Python {h.get('python_version') or hi.get('python', '?')}",
                           f"torch {pk['torch']}" if 'torch' in pk else None,
                           f"{hi['threads']} threads" if 'threads' in hi else None) if x]
    print(f"host        {h.get('hostname', '?')}  ({', '.join(details)})")
    origin = cfg.get('provenance') or {}
    print(f"code        {code_line(origin.get('code') or {})}"
          + (f"   seed {cfg['seed']}" if cfg.get('seed') is not None else ''))
    for resumed in info.get('resumes') or []:
        print(f"            resumed at step {resumed.get('at_step')} by {code_line(resumed.get('code') or {})}")
    for stage, comps in (origin.get('init_from') or {}).items():
        for comp, src in comps.items():
            files = ', '.join(f"{f['path']} (sha256 {f['sha256'][:12]})" for f in src.get('files') or [])
            print(f"init_from   {stage}: {comp.replace(':', '.')} <- {src.get('source')}: {files}")


def _show_folder(db, run: RunRecord) -> None:
    """The run folder, its data and how the run ended."""
    info = run.info
    run_dir = info.get('run_dir')
    print(f"run folder  {run_dir or '?'}"
          + ('' if not run_dir or Path(run_dir).is_dir() else '  (not on this machine)')
          + (f"   (tensorboard --logdir {Path(run_dir).parent})"
             if run_dir and (Path(run_dir) / 'tensorboard').is_dir() else ''))
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


def _show_plan(db, run: RunRecord) -> None:
    print('\nplan')
    for k, v in plan_summary(run.plan):
        print(f'  {k:<11} {v}')
    stages = run.plan.get('curriculum') or []
    if stages:
        print('  curriculum')
        print(table(['stage', 'steps', 'lr', 'objectives', ''], [stage_line(s) for s in stages], right={1, 2},
                    indent='    '))


def _show_metrics(db, run: RunRecord) -> None:
    sm = stage_end_metrics(db, run)
    print('\nstage-end metrics (eval, at each stage\'s last step)')
    print(metrics_table(sm, run.end_steps) if sm else '  none recorded')
    evals = latest_evaluations(db.evaluations(run.id))
    print('\nevaluations (python -m runtime.evaluate; the newest of each)')
    print(table(['stage', 'memory', 'limit', 'task', 'metric', 'value', 'evaluated (UTC)'],
                [[e.stage, e.memory, '-' if e.limit is None else str(e.limit), e.task, e.metric, num(e.value),
                  when(e.time)] for e in evals], right={2, 5}, indent='  ') if evals else '  none recorded')


def _show_weights(db, run: RunRecord) -> None:
    weights = run.info.get('weights') or {}
    refs = [(f'stages/{s}', r) for s, r in (weights.get('stages') or {}).items()] \
        + ([('final', weights['final'])] if weights.get('final') else [])
    print('\nweights (path and sha256; the bytes stay in the run folder)')
    print(table(['weights', 'bytes', 'sha256', 'path'],
                [[n, f"{r.get('bytes', 0):,}", str(r.get('sha256'))[:16],
                  str(r.get('path')) + ('' if Path(str(r.get('path'))).is_file() else '  (missing here)')]
                 for n, r in refs], right={1}, indent='  ') if refs else '  none recorded')
    arts = db.artifacts(run.id)
    print('\nartifacts')
    print(table(['name', 'bytes'], [[n, f'{s:,}'] for n, s in arts], right={1}, indent='  ') if arts
          else '  none recorded')


def select_metrics(rows, patterns: list[str] | None, run_id: str, place: str = '--name'):
    if not rows:
        raise UserError(f'run {run_id}', 'no metrics recorded for this run',
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
            raise UserError(f'{place} {p}', f'run {run_id} has no metric matching this',
                            f"{hint}give a substring or glob of one of: {', '.join(names)}")
        keep |= hits
    return [r for r in rows if r[0] in keep]


def cmd_metrics(db, args) -> None:
    runs = [record_of(db, i) for i in dict.fromkeys(args.ids)]
    every = {r.id: db.metrics(r.id) for r in runs}
    for r in runs:
        if not every[r.id]:
            select_metrics([], None, r.id)  # raises: no metrics recorded for this run
    union = sorted({row for rows in every.values() for row in rows})
    picked = {n for n, _, _ in select_metrics(union, args.name, ', '.join(every))}
    rows = {r.id: [row for row in every[r.id] if row[0] in picked] for r in runs}
    if args.plot:
        ids = ', '.join(r.id for r in runs)
        title = f'run {runs[0].id}  {spec_text(runs[0])}  ({runs[0].status})' if len(runs) == 1 else \
            f'runs {ids}'
        curves([Series(f'run {r.id}  {spec_text(r)}', rows[r.id], r.end_steps) for r in runs], args.plot, title)
    elif args.json:
        print_json([{'run': r, 'name': n, 'step': s, 'value': v} for r, rs in rows.items() for n, s, v in rs])
    elif args.csv:
        print_csv(['run', 'name', 'step', 'value'], [[r, n, s, v] for r, rs in rows.items() for n, s, v in rs])
    else:
        print(table(['run', 'name', 'step', 'value'],
                    [[r, n, str(s), f'{v:.6g}'] for r, rs in rows.items() for n, s, v in rs], right={2, 3}))


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


# ------------------------------------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--db', metavar='URL',
                        help=f'run database: sqlite:///path.db, postgresql://user:pw@host/db or mongodb://host '
                             f'(default: the sacred.db beside a run folder given by its path, else {DEFAULT_DB})')
    ap = argparse.ArgumentParser(prog='python -m store.runs', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='\n\n'.join(__doc__.split('\n\n')[1:3]))

    def formats(p):
        out = p.add_mutually_exclusive_group()
        out.add_argument('--json', action='store_true', help='print one JSON document instead of text')
        out.add_argument('--csv', action='store_true', help='print one CSV table (exact values) instead of text')
        return out

    sub = ap.add_subparsers(dest='command', required=True, metavar='{list,show,metrics,compare}')
    p = sub.add_parser('list', parents=[common], help='one line per run')
    p.add_argument('--spec', metavar='SUBSTRING', help='only runs whose spec file paths contain this')
    p.add_argument('--status', type=str.upper, choices=STATUSES, help='only runs with this status')
    p.add_argument('--where', action='append', metavar='KEY=VALUE',
                   help="plan filter, repeatable (all must hold): 'Memory.chunks=4', 'encoder/Stack.d_model=128', "
                        "'blank/Stage.lr=1e-3', a macro 'LR=1e-3', or a flattened key 'plan.memory.chunks=4'; "
                        "'!=' negates")
    formats(p)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser('show', parents=[common], help='one run in full')
    p.add_argument('id', metavar='RUN')
    p.add_argument('--keys', action='store_true',
                   help='print the flattened config keys (what --where and compare read)')
    formats(p)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser('metrics', parents=[common], help="the logged metrics of one or more runs")
    p.add_argument('ids', nargs='+', metavar='RUN')
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help="metric names containing this (or matching a glob such as 'eval/*accuracy'); repeatable")
    formats(p).add_argument('--plot', metavar='OUT.png',
                            help='overlay the runs: one panel per metric kind, a colour per run, a line style per '
                                 'metric, lines at stage ends')
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser('compare', parents=[common], help='what differs between runs')
    p.add_argument('ids', nargs='+', metavar='RUN')
    p.add_argument('--all', action='store_true', help='list every plan key, not only those that differ')
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help='stage-end metrics to compare (default: headline)')
    p.add_argument('--color', choices=('auto', 'always', 'never'), default='auto',
                   help='bold differing values (auto: when stdout is a terminal; otherwise they get a *)')
    formats(p)
    p.set_defaults(func=cmd_compare)
    return ap


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    refs = [args.id] if hasattr(args, 'id') else getattr(args, 'ids', [])
    db = open_db(args.db or next(filter(None, (database_for(r, None) for r in refs)), DEFAULT_DB))
    try:
        args.func(db, args)
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


if __name__ == '__main__':
    main()
