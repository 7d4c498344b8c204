"""Fault injection: kill -9 at seeded random moments of a tiny run, then --resume; resource faults; concurrent runs.

The machinery of tests/test_faults.py and tests/test_concurrency.py (which run bounded versions), and a command for
longer campaigns:

    python tests/faults.py [--kills 40] [--seed 0] [--jobs 2] [--no-faults] [--concurrent 4]
                                           [--postgres URL] [--json benchmarks/results/reliability.json]

The run: the flagship spec at the tiny development scale, cut to two stages (autoencode 3 steps, blank_copy 3 steps;
checkpoints every 2 steps and at stage ends; metrics every step; memories of the 507 held-out sequences written to
the Zarr store at both stage ends, in two appends each). One uninterrupted baseline run is the reference; it also
counts how often each hook below is called, so kill points land inside the run.

Kill points (a forked copy of this process runs `runtime.run.main` with one hook patched to SIGKILL itself at its
k-th call; the hook and k are drawn from --seed; categories rotate so every category is hit):
- mid-step:         runtime.train.stage_loss (a batch drawn, no update yet), runtime.run.evaluate
- checkpoint write: store.files.atomic_write (checkpoint.pt, its sha256 file, stage and final safetensors), killed
                    before, in the middle of the temporary file (truncated to half), after it, or after the rename;
                    torch.save with half of the bytes written
- Zarr append:      store.memories.Writer: after the group is created, in an append between arrays, after an append,
                    before and after the group is marked complete
- database write:   every commit of the run database (run row, heartbeats, metrics, artifacts, status), before or
                    after the commit
A quarter of the points also kill the resumed run once more. Then `--resume ID` (or, when the kill came before the
run was recorded at all, the same command again), and the checks: exit 0; summary.json, final.safetensors and every
stage's safetensors equal the baseline's; the database holds exactly one run row, COMPLETED, with the baseline's
metrics (every (name, step) once, same values), stage end steps, result and artifacts; the Zarr store holds exactly
the baseline's groups, complete, with the same rows; the checkpoint verifies against its sha256 file; no temporary
files are left.

Resource faults (each followed by the same checks after --resume where the run is resumable):
- disk full while checkpointing (torch.save raises ENOSPC after half the bytes): exit 1, one message, no traceback,
  the previous checkpoint intact (same sha256), no temporary file left
- disk full while writing memories (ENOSPC after the first array of an append): exit 1, group left incomplete
  (readers refuse it), rewritten whole on resume
- unwritable output folder (a file where Run.out_dir should be; EACCES simulated when running as root): exit 2,
  nothing written
- run database unreachable at start (PostgreSQL port 1; an SQLite path under a file): exit 2, nothing written
- run database gone mid-run (SQLite: every statement fails from step 4 on; PostgreSQL with --postgres: the database
  stops accepting connections and its sessions are terminated): the run stops before its next checkpoint with exit
  1 and one message; resumed once the database is back, nothing is lost
- corrupted checkpoint (bytes flipped after a kill): --resume exits 2 naming the file and the sha256 mismatch;
  deleting checkpoint.pt and checkpoint.pt.sha256, as the message says, restarts the run from its first step under
  the same id, which again ends equal to the baseline

Hardening scenarios (one per class of failure found by the adversarial pass; each would have caught it):
- real full disk: out_dir on a 32 MiB tmpfs the suite mounts (skipped, with the reason, where mounting is impossible),
  filled to the last byte just before a checkpoint, a memory append or the final weights: torch.save then raises
  RuntimeError ('unexpected pos'), safetensors and zarr their own errors. Exit 1, one message naming the file, the
  disk and its free space, FAILED, last checkpoint intact, no temporaries; space freed, --resume equals the baseline
- SIGTERM sent by the suite to a live run held mid-step, in evaluation, in a memory append or in a checkpoint write:
  exit 143, one message, INTERRUPTED, a resume point that verifies; --resume equals the baseline
- --resume of a run whose process is alive: exit 2 naming its pid and host, the record untouched; the process killed,
  `store.runs list` flags the row as stale (heartbeat made 2 h old) and a plain --resume takes the run over
- crafted checkpoint: a pickle whose __reduce__ creates a file (raw, and in torch's zip format) with a matching sha256
  file; --resume refuses it and the file is never created; --resume with a path is refused
- two run databases sharing an out_dir, and another out_dir sharing its memory store (three runs numbered 0):
  distinct folders and groups; the baseline-equal run stays equal; store.analyze and runtime.generate refuse the
  ambiguous id listing the runs, and by full name (analyze also by --db) give each run's own numbers
- damaged memory store (a missing chunk, a corrupt chunk, garbled group and array metadata): store.analyze and
  runtime.generate --memories exit 2 naming the run, stage and rows, printing no numbers
- damaged data cache (truncated train.tokens, garbage meta.json or tokenizer.json): one note, rebuilt, the run equals
  the baseline; an unwritable cache folder: exit 2, nothing recorded
- refused before any work: in-memory SQLite (sqlite://, sqlite:///:memory:), a memory store on a read-only filesystem
  or with garbled metadata, a truncated .safetensors as init_from source or for runtime.generate
- PostgreSQL with a password (a throwaway role): runs, a failing run, a wrong password, --resume, store.runs and
  store.analyze; the password is in no output, no file under the out_dir and no database row
Every scenario also checks that the files a run leaves have the mode the umask gives (mkstemp's 0600 would keep
other users from resuming or generating).

--concurrent N: N runs forked at the same instant on one SQLite database and one Zarr store (and on PostgreSQL with
--postgres): distinct ids, complete records and memories for all.

Prints a summary table (faults injected, runs survived, records lost, records duplicated) and writes JSON (default
benchmarks/results/reliability.json). tests/test_faults.py and tests/test_concurrency.py run bounded versions
(`--kills 10`). Exit code 1 when any run did not survive or any record was lost or duplicated.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fault_injection/, beside this file

from fault_injection.common import BINDINGS, ROOT, SPEC, torch  # noqa: E402  (sets up the process first)
from fault_injection.report import postgres_url, run_parallel, summarize, table  # noqa: E402
from fault_injection.suite import Suite  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--kills', type=int, default=40, help='kill points (default 40; CI runs 10)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--jobs', type=int, default=2, help='scenarios run side by side (each single-threaded)')
    ap.add_argument('--no-faults', action='store_true', help='skip the resource-fault scenarios')
    ap.add_argument('--only-faults', nargs='*', help='run only these fault scenarios (names as in the table)')
    ap.add_argument('--concurrent', type=int, default=0,
                    help='also start this many runs at once on one database and store')
    ap.add_argument('--postgres', help="admin URL of a PostgreSQL server (default: $MEMSPEC_TEST_POSTGRES "
                                       "or a local server if reachable; 'none' to skip)")
    ap.add_argument('--root', help='work folder (default: a temporary folder, removed afterwards)')
    ap.add_argument('--cache', help='data cache folder shared by the runs (default: <root>/cache)')
    ap.add_argument('--json', default=str(ROOT / 'benchmarks' / 'results' / 'reliability.json'))
    ap.add_argument('--keep', action='store_true', help='keep the work folder')
    args = ap.parse_args(argv)

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix='memspec-reliability-'))
    if args.root and root.is_dir() and any(root.iterdir()):
        ap.error(f'--root {root} is not empty: give a new or empty work folder')
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else root / 'cache'
    pg = postgres_url(args.postgres)
    suite = Suite(root, cache, args.seed, pg)
    t0 = time.perf_counter()
    try:
        print(f'reliability suite: seed {args.seed}, {args.kills} kill points, work folder {root}', flush=True)
        warm = suite.warm_up()
        base = suite.baseline()
        base['warm_up_seconds'] = warm
        print(f"  baseline                     ok  {base['seconds']:>6.1f} s  hook calls {base['counts']}", flush=True)
        tasks = [(p['id'], (lambda p=p: suite.kill_point(p))) for p in suite.plan_kills(args.kills)]
        if not args.no_faults:
            tasks += [(name, fn) for name, fn in suite.faults() if args.only_faults is None or name in args.only_faults]
        if args.concurrent:
            tasks.append(('concurrent_sqlite', lambda: suite.concurrent(args.concurrent, None, 'sqlite')))
            if pg:
                tasks.append(('concurrent_postgres', lambda: suite.concurrent_pg(args.concurrent)))
        points = run_parallel(tasks, max(1, args.jobs), root)
        summary = summarize(points)
        report = {'seed': args.seed, 'kills': args.kills, 'spec': SPEC, 'bindings': BINDINGS, 'baseline': base,
                  'postgres': bool(pg), 'seconds': round(time.perf_counter() - t0, 1), 'summary': summary,
                  'points': points,
                  'machine': {'cpus': os.cpu_count(), 'torch': torch.__version__}}
        print('\n' + table(points))
        print(f"\nfaults injected {summary['faults_injected']}, runs survived {summary['runs_survived']} of "
              f"{summary['runs']}, records lost {summary['records_lost']}, records duplicated "
              f"{summary['records_duplicated']}  ({report['seconds']} s)")
        for name, why in summary['skipped'].items():
            print(f'\nSKIPPED {name}: {why}')
        for p in points:
            if not p.get('survived'):
                print(f"\nFAILED {p['id']} {p.get('hooks', '')}:\n  " + '\n  '.join(p['problems']))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
            print(f'\nwrote {args.json}')
        return 0 if (not summary['runs_failed'] and not summary['records_lost']
                     and not summary['records_duplicated']) else 1
    finally:
        if not args.root and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
