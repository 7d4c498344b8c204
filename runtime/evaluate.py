"""python -m runtime.evaluate RUN [--stage S] --tasks T1,T2 [--limit N] [--memory MODE] [--json]

Evaluates a recorded run without training: weights, tokenizer and plan come from the run folder, the tasks from
lm-evaluation-harness (the offline `memspec` group of specs/eval, or any harness task where the network is
available), the model through the `memspec` adapter (runtime/lm_adapter.py). The results are recorded in the run's
database (`memspec_evaluations`, store/database.py: one row per task and metric, tied to the run and the stage),
printed as a table (or as JSON with --json) and written to <run>/evaluations/<stage>.<memory>.json. Standard errors
are the harness' (analytic for means, bootstrapped for the rest: --bootstrap-iters) and are recorded as the metric
'<metric>_stderr', as the harness names them. The hub is reached as the environment says (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE); a harness task whose dataset is neither cached nor reachable is refused with the command
that caches it.

    python -m runtime.evaluate runs/0 --tasks memspec
    python -m runtime.evaluate 0 --runs runs --stage blank_copy --tasks memspec_needle --memory ablated --limit 50
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

from compiler.args import MANY, Parser, integer
from compiler.errors import UserError, cli
from runtime.reading import MODES
from store.database import default_url, display_url, get_run, open_db, record_evaluations
from store.files import write_text
from store.runref import folder_of
from store.tables import num, table

ROOT = Path(__file__).resolve().parent.parent
TASKS_DIR = ROOT / 'specs' / 'eval'


def parser() -> Parser:
    ap = Parser(prog='python -m runtime.evaluate', description=__doc__.split('\n\n')[1])
    ap.add_argument('run', metavar='RUN', help="run id or full name <id>-<key> under --runs, or a run folder's path")
    ap.add_argument('--runs', default='runs', help='folder of run folders (default runs)')
    ap.add_argument('--stage', help='weights at the end of this stage (default: final.safetensors)')
    ap.add_argument('--tasks', required=True,
                    help='comma-separated harness tasks or groups (memspec: the offline set)')
    ap.add_argument('--limit', type=integer(1, MANY), help='at most this many documents per task')
    ap.add_argument('--memory', default='on', choices=MODES, help='on (default), ablated or full_context '
                    '(runtime/reading.py)')
    ap.add_argument('--db', help='run database (default: <run folder>/../sacred.db, where runtime.run records)')
    ap.add_argument('--include-path', default=str(TASKS_DIR), help='task YAML folder (default specs/eval)')
    ap.add_argument('--batch-size', type=integer(1, 2 ** 16), default=32, help='rows per decoder call')
    ap.add_argument('--bootstrap-iters', type=integer(0, 10 ** 7), default=100000,
                    help="bootstrap resamples for the standard errors of metrics that are not means (the harness' "
                         'default 100000; 0: no standard errors)')
    ap.add_argument('--gen-kwargs', metavar='K=V,...',
                    help="generation settings for generate_until tasks, as lm_eval's --gen_kwargs, e.g. "
                         'max_gen_toks=8 (a plain LM refuses max_gen_toks at least its window)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--json', action='store_true', help='print the results as JSON instead of a table')
    return ap


def task_manager(text: str, include_path: str, metadata: dict):
    """(harness TaskManager, task names). The harness' own index of thousands of task YAMLs takes a minute to build
    on 2 cores, so it is built only when a task is not one of include_path's."""
    from lm_eval.tasks import TaskManager
    names = [t.strip() for t in text.split(',') if t.strip()]
    manager = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
    if any(t not in set(manager.all_tasks) and not t.startswith('memspec') for t in names):  # the harness' own
        manager = TaskManager(include_path=include_path, metadata=metadata)
    return manager, task_names(names, text, manager)


def task_names(names: list[str], text: str, manager) -> list[str]:
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        groups = sorted(t for t in known if t.startswith('memspec'))
        raise UserError(f"--tasks {text}", f"unknown task {', '.join(unknown)}" if unknown else 'no task given',
                        f"name harness tasks or groups, e.g. {', '.join(groups)} (list them all: python -m "
                        'runtime.harness ls tasks --include_path specs/eval)')
    return names


def check_available(manager, tasks: list[str]) -> None:
    """Load each harness task (not the local memspec ones) before anything runs: one whose dataset is neither
    cached nor reachable is refused with the command that caches it."""
    offline = any(os.environ.get(k, '').strip().lower() in ('1', 'true', 'yes', 'on')
                  for k in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'))
    for task in tasks:
        if task.startswith('memspec'):
            continue
        try:
            manager.load([task])
        except Exception as e:  # noqa: BLE001  (datasets' and the hub's errors differ by version; all mean the same)
            fetch = ('HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c "from lm_eval.tasks import TaskManager; '
                     f"TaskManager().load(['{task}'])\"")
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = ('its dataset is not in the local cache and the hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)'
                    if offline else 'its dataset could not be loaded')
            raise UserError(f'--tasks {task}', f'{what}: {type(e).__name__}: {why}',
                            f'cache it once where the network is reachable: {fetch}') from None


def rows_of(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) of the harness' results (groups without metrics of their own are left out)."""
    out = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(',')
            if not comma or metric.endswith('_stderr') or not isinstance(value, (int, float)):  # alias, sample_len
                continue
            err = metrics.get(f'{metric}_stderr,{filt}')
            out.append((task, metric, float(value), float(err) if isinstance(err, (int, float)) else None))
    return out


def record(url: str, run_id: str, stage: str, memory: str, limit: int | None, rows: list, now) -> None:
    """The results' rows in the run's evaluations table; a standard error as the metric '<metric>_stderr'."""
    record_evaluations(url, run_id, [{'stage': stage, 'task': t, 'metric': name, 'value': v, 'memory': memory,
                                      'limit': limit, 'time': now}
                                     for t, m, value, err in rows
                                     for name, v in ((m, value), (f'{m}_stderr', err)) if v is not None])


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    run = folder_of(args.run, args.runs)
    folder = run.root
    url = args.db or default_url(run.out_dir)
    if url.startswith('mongodb'):
        raise UserError(f'--db {display_url(url)}', 'evaluations are recorded in SQL run databases only',
                        'record the run in sqlite:/// or postgresql:// (python -m runtime.run ... --db URL)')
    run_id = run.run_id
    get_run(open_db(url), run_id)  # the run must be recorded where its evaluation goes
    try:
        import lm_eval

        from runtime.lm_adapter import MemspecLM
    except ImportError as e:
        raise UserError('python -m runtime.evaluate', f'lm-evaluation-harness is not installed ({e})',
                        "pip install -e '.[eval]'")
    if not Path(args.include_path).is_dir():
        raise UserError(f'--include-path {args.include_path}', 'no such folder', 'point it at specs/eval')
    lm = MemspecLM(run=str(folder), stage=args.stage, memory=args.memory, device=args.device,
                   batch_size=args.batch_size)  # refuses an unknown stage or a mode the family lacks
    manager, tasks = task_manager(args.tasks, args.include_path, {'run': str(folder), 'runs': args.runs})
    check_available(manager, tasks)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                  bootstrap_iters=args.bootstrap_iters, log_samples=False, gen_kwargs=args.gen_kwargs)
    rows = rows_of(res['results'])
    docs = {t: n.get('effective') for t, n in (res.get('n-samples') or {}).items()}
    stage = args.stage or 'final'
    now = dt.datetime.now(dt.timezone.utc)
    record(url, run_id, stage, args.memory, args.limit, rows, now)
    report = {'run': run_id, 'run_folder': str(folder), 'stage': stage, 'memory': args.memory,
              'limit': args.limit, 'tasks': tasks, 'family': lm.plan.family, 'time': now.isoformat(),
              'documents': docs, 'results': [{'task': t, 'metric': m, 'value': v, 'stderr': e} for t, m, v, e in rows]}
    out = folder / 'evaluations' / f'{stage}.{args.memory}.json'
    write_text(out, json.dumps(report, indent=1))  # never a half-written report, never through a planted link
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f'run {run_id} ({lm.plan.family}), stage {stage}, memory {args.memory}'
          + (f', limit {args.limit}' if args.limit else ''))
    print(table(['task', 'documents', 'metric', 'value', 'stderr'],
                [[t, str(docs.get(t, '-')), m, num(v), num(e)] for t, m, v, e in rows], right={1, 3, 4}))
    print(f'\nrecorded in {display_url(url)} (memspec_evaluations), written to {out}', file=sys.stderr)


if __name__ == '__main__':
    main()
