"""python -m store.runs {list,show,metrics,compare,group,tag,note,delete} [--db URL] ...: the runs `runtime.run` recorded.

    list                       one line per run: id, spec, status, stages, final eval metrics, start time
                               (--spec SUBSTRING, --status STATUS, --where KEY=VALUE, repeatable); a RUNNING run
                               whose heartbeat stopped shows as 'RUNNING (stale: no heartbeat for 2 h 05 min)'
    show RUN                   plan summary, host, provenance, run folder, weights, artifacts, stage-end metrics,
                               evaluations, operative gin
    metrics RUN [RUN ...]      every logged value (run, name, step, value; --name PAT); --plot OUT.png overlays the
                               runs, one panel per metric kind (store/plots.py)
    compare RUN RUN ...        plan keys, CLI bindings, stage-end metrics and evaluations that differ between runs
    group KEY [KEY ...]        runs grouped by config keys (grid points), each metric's final value as mean ± standard
                               error over the runs of a group (seeds); the filters of list (store/groups.py)
    tag RUN TAG [TAG ...]      tag a run (--remove: untag); `list --tag TAG` filters by tags (store/manage.py)
    note RUN TEXT              the run's note ('' removes it); list and show print tags and notes
    delete RUN                 the run's database rows, its run folder and its memories (asks; --yes)

RUN is a run id, its full name <id>-<key>, or its run folder's path (store/runref.py). Every command also prints
--json (one JSON document) or --csv (one table) instead of text.

The database is Sacred's (SqlObserver tables `run`, `host`, `experiment`, `artifact`, ...) plus our
`memspec_metrics(run_id, name, step, value, time)` table: sqlite:///runs/sacred.db by default, or a PostgreSQL URL;
a mongodb:// URL reads Sacred's MongoObserver collections (needs pymongo). Queries are SQLAlchemy Core text
statements, so SQLite and PostgreSQL run the same code. The query commands open SQLite files read-only and never
create one; tag, note and delete write (store/manage.py).
"""  # noqa: E501 (the first line is printed verbatim as the --help description)
from __future__ import annotations

import argparse
import difflib
import fnmatch
import os
import sys
from pathlib import Path

from compiler.args import Parser
from compiler.errors import UserError, cli
from store import groups, manage
from store.compare import cmd_compare
from store.database import (
    DEFAULT_DB,
    STATUSES,
    RunRecord,
    flatten,
    latest_evaluations,
    open_db,
)
from store.plots import Series, curves
from store.runref import database_for, record_of
from store.tables import (
    duration,
    fmt,
    metrics_table,
    num,
    plain,
    plan_summary,
    print_csv,
    print_json,
    spec_label,
    spec_text,
    stage_line,
    table,
    top_specs,
    when,
)
from store.views import code_line, stage_end_metrics, status_text
from store.where import Where, bindings

# final eval metrics shown by `list` (column title, metric name)
HEADLINE = [('clm.ce', 'eval/clm.ce'), ('blank_copy acc', 'eval/blank_copy.token_accuracy'),
            ('copy acc', 'eval/copy.token_accuracy'), ('autoencode acc', 'eval/autoencode.token_accuracy')]


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


def select_runs(db, args) -> tuple[list[RunRecord], dict]:
    """(the runs that pass list's filters --spec, --status, --where and --tag; their tags and notes)."""
    wheres = [Where(w) for w in args.where or []]
    runs = _listed(db, args, wheres)
    marks = manage.labels(db, [r.id for r in runs])
    runs = [r for r in runs if set(args.tag or []) <= set(marks.get(r.id, {}).get('tags', []))]
    if not runs:
        print('no runs match' if (args.spec or args.status or wheres or args.tag) else f'no runs in {db.name}',
              file=sys.stderr)
    return runs, {r.id: marks[r.id] for r in runs if r.id in marks}


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
    runs, marks = select_runs(db, args)
    if not runs:
        return
    finals = _headline(db, runs)
    cols = [(t, n) for t, n in HEADLINE if any(n in finals.get(r.id, {}) for r in runs)]
    headers = ['id', 'spec', 'status', 'stages'] + [t for t, _ in cols] + ['started (UTC)']
    if args.json or args.csv:
        docs = [{'id': r.id, 'name': r.name, 'spec': spec_text(r), 'status': status_text(r), 'stages': r.stages,
                 'stages_done': stages_done(db, r), **{n: finals.get(r.id, {}).get(n) for _, n in cols},
                 'started': r.start, 'tags': marks.get(r.id, {}).get('tags', []),
                 'note': marks.get(r.id, {}).get('note')} for r in runs]
        if args.json:
            print_json(docs)
        else:
            print_csv(list(docs[0]), [list(d.values()) for d in docs])
        return
    rows = []
    for r in runs:
        stages = ','.join(r.stages)
        if r.status != 'COMPLETED' and r.stages:
            stages += f' ({stages_done(db, r)}/{len(r.stages)} done)'
        rows.append([r.id, spec_text(r), status_text(r), stages] + [num(finals.get(r.id, {}).get(n)) for _, n in cols]
                    + [when(r.start)] + ([manage.label_text(marks.get(r.id))] if marks else []))
    print(table(headers + (['tags / note'] if marks else []), rows, right={0} | set(range(4, 4 + len(cols)))))


def stages_done(db, run: RunRecord) -> int:
    """Curriculum stages the run finished: those of its plan with a recorded end step (info.stages, which Sacred
    saves with each heartbeat, every 10 s: a live or killed run's lags) or with eval metrics at the stage's last
    step (written as they are logged; a resume forgets what was logged after its checkpoint)."""
    ends, step, by_end = run.end_steps, 0, {}
    for s in run.plan.get('curriculum') or []:
        step += int(s.get('steps', 0)) if isinstance(s.get('steps'), int) else 0
        by_end[step] = s.get('name')
    todo = [e for e, s in by_end.items() if s not in ends]
    logged = {st for _, st, _ in db.at_steps(run.id, todo)} if todo and run.status != 'COMPLETED' else set()
    return sum(1 for e, s in by_end.items() if s in ends or e in logged)


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
            'operative_gin': cfg.get('operative_gin'), **_marks(db, run)}


def _marks(db, run: RunRecord) -> dict:
    m = manage.labels(db, [run.id]).get(run.id) or {}
    return {'tags': m.get('tags', []), 'note': m.get('note')}


def cmd_show(db, args) -> None:
    run = record_of(db, args.id)
    if args.keys:
        for k, v in run.flat.items():
            if k not in ('operative_gin',):
                print(f'{k} = {fmt(v)}')
    elif args.json:
        print_json(show_document(db, run))
    elif args.csv:
        print_csv(['key', 'value'], [[k, v] for k, v in flatten(plain(show_document(db, run))).items()])
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
    marks = _marks(db, run)
    if marks['tags']:
        print(f"tags        {', '.join(marks['tags'])}")
    if marks['note']:
        print(f"note        {marks['note']}")
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
        curves([Series(label, rows[r.id], r.end_steps) for r, label in zip(runs, grid_labels(runs))], args.plot,
               title)
    elif args.json:
        print_json([{'run': r, 'name': n, 'step': s, 'value': v} for r, rs in rows.items() for n, s, v in rs])
    elif args.csv:
        print_csv(['run', 'name', 'step', 'value'], [[r, n, s, v] for r, rs in rows.items() for n, s, v in rs])
    else:
        print(table(['run', 'name', 'step', 'value'],
                    [[r, n, str(s), f'{v:.6g}'] for r, rs in rows.items() for n, s, v in rs], right={2, 3}))


def cmd_group(db, args) -> None:
    runs, _ = select_runs(db, args)
    if not runs:
        return
    every = sorted({n for r in runs for n, _, _ in db.metrics(r.id)})
    if args.name:
        names = sorted({n for n, _, _ in select_metrics([(n, 0, 0.0) for n in every], args.name, 'selected')})
    else:
        names = [n for _, n in HEADLINE if n in every] or [n for n in every if n.startswith('eval/')]
    docs = groups.groups(runs, args.keys, db.final_metrics([r.id for r in runs], names), names)
    if args.json:
        print_json(docs)
    elif args.csv:
        print_csv(*groups.csv_rows(docs, args.keys, names))
    else:
        print(groups.render(docs, args.keys, names))


def grid_labels(runs: list[RunRecord]) -> list[str]:
    """Legend labels that tell the runs apart: 'run 3  LR=1e-3, Run.seed=1' (the command-line bindings and seed
    that differ between the runs: a sweep's grid values), else 'run 3  <spec>'."""
    bs = [{**bindings(r), 'seed': str(r.config.get('seed'))} for r in runs]
    keys = [k for k in dict.fromkeys(k for b in bs for k in b) if len({b.get(k) for b in bs}) > 1]
    if 'Run.seed' in keys:
        keys.remove('seed')
    return [f'run {r.id}  ' + (', '.join(f'{k}={b[k]}' for k in keys if k in b) if keys else spec_text(r))
            for r, b in zip(runs, bs)]


# ------------------------------------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--db', metavar='URL',
                        help=f'run database: sqlite:///path.db, postgresql://user:pw@host/db or mongodb://host '
                             f'(default: the sacred.db beside a run folder given by its path, else {DEFAULT_DB})')
    ap = Parser(prog='python -m store.runs', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog='\n\n'.join(__doc__.split('\n\n')[1:3]))

    def formats(p):
        out = p.add_mutually_exclusive_group()
        out.add_argument('--json', action='store_true', help='print one JSON document instead of text')
        out.add_argument('--csv', action='store_true', help='print one CSV table (exact values) instead of text')
        return out

    def filters(p):
        p.add_argument('--spec', metavar='SUBSTRING', help='only runs whose spec file paths contain this')
        p.add_argument('--status', type=str.upper, choices=STATUSES, help='only runs with this status')
        p.add_argument('--where', action='append', metavar='KEY=VALUE',
                       help="plan filter, repeatable (all must hold): 'Memory.chunks=4', 'encoder/Stack.d_model=128', "
                            "'blank/Stage.lr=1e-3', a macro 'LR=1e-3', or a flattened key 'plan.memory.chunks=4'; "
                            "'!=' negates")
        p.add_argument('--tag', action='append', metavar='TAG', help='only runs with this tag (repeatable: all)')

    sub = ap.add_subparsers(dest='command', required=True,
                            metavar='{list,show,metrics,compare,group,tag,note,delete}')
    p = sub.add_parser('list', parents=[common], help='one line per run')
    filters(p)
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
    p = sub.add_parser('group', parents=[common], help='mean ± standard error of runs grouped by config keys')
    p.add_argument('keys', nargs='+', metavar='KEY',
                   help="config keys to group by, as --where writes them: 'autoencode/Stage.lr', 'Memory.chunks', "
                        "a macro 'LR', or 'plan.memory.chunks'")
    p.add_argument('--name', action='append', metavar='PATTERN',
                   help='metrics to aggregate (substring or glob; default: the headline eval metrics)')
    filters(p)
    formats(p)
    p.set_defaults(func=cmd_group)
    p = sub.add_parser('tag', parents=[common], help='tag a run (or untag it with --remove)')
    p.add_argument('id', metavar='RUN')
    p.add_argument('tags', nargs='+', metavar='TAG')
    p.add_argument('--remove', action='store_true', help='remove these tags instead')
    p.set_defaults(func=manage.cmd_tag)
    p = sub.add_parser('note', parents=[common], help="set a run's note ('' removes it)")
    p.add_argument('id', metavar='RUN')
    p.add_argument('text', nargs='+', metavar='TEXT')
    p.set_defaults(func=manage.cmd_note)
    p = sub.add_parser('delete', parents=[common], help='delete a run: database rows, run folder and memories')
    p.add_argument('id', metavar='RUN')
    p.add_argument('--yes', action='store_true', help='do not ask for confirmation')
    p.set_defaults(func=manage.cmd_delete)
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
