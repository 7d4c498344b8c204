"""The driver: runs a sweep's members (dependencies first, at most --jobs at once), skipping, resuming or starting
each from what the run database says when its turn comes, and prints the table of outcomes."""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

from compiler.errors import UserError
from runtime.sweep.claims import BEAT_EVERY, Claims
from runtime.sweep.executors import make_executor
from runtime.sweep.expand import Member, compile_member, expand, stored
from runtime.sweep.record import _identity, prior, records, resumable
from runtime.sweep.spec import Layout
from store import database
from store.files import write_text
from store.tables import duration, table

ROOT = Path(__file__).resolve().parents[2]

def execute(layout: Layout, extra: list[str], args) -> int:
    """Expand and check the sweep, then run its members; print the table. -> exit code (0: every member completed,
    1: not all did, 130: interrupted)."""
    from runtime import record
    members = expand(layout, extra)
    out_dir = Path(members[0].spec.plan.run.out_dir)
    url = args.db or database.default_url(str(out_dir))
    sweep_id = f"{layout.sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    folder = out_dir / 'sweeps' / sweep_id
    pool = make_executor(args, folder)
    obs = record.observer(url)  # the database answers (else exit 2) and has its tables before any member starts
    if hasattr(obs, 'engine'):
        obs.engine.dispose()
    folder.mkdir(parents=True, exist_ok=True)
    claims = Claims(url, layout.sweep.name, sweep_id)
    driver = Driver(layout.sweep.name, sweep_id, url, args, folder, pool, records(url, layout.sweep.name), claims)
    print(f'sweep {sweep_id}: {len(members)} members, {args.executor} executor, {args.jobs} at once, '
          f'{pool.threads} thread(s) each\nlogs in {folder}', flush=True)
    if not claims.supported:
        print('note: a MongoDB run database holds no claims: do not run this sweep twice at the same time (a member '
              'could start twice)', flush=True)
    try:
        driver.run(members)
    finally:
        pool.close()
        claims.close()
    text = summary(members)
    write_text(folder / 'summary.txt', text + '\n')
    db = '' if url == database.DEFAULT_DB else f' --db {database.display_url(url)}'
    started = any(m.run_id and not (m.before or m.resume) for m in members)  # what `status SWEEP_ID` lists
    print(f'\nsweep {sweep_id} ({layout.sweep.name})\n\n{text}\n\nlogs      {folder}\n'
          f'database  {database.display_url(url)}'
          + (f'  (python -m runtime.sweep status {sweep_id}{db})' if started else ''))
    for m in members:
        if m.status in ('FAILED', 'REFUSED', 'INTERRUPTED'):
            print(f'  {m.label} {m.status}: see {folder / (m.label + ".log")}')
    if any(m.status == 'INTERRUPTED' for m in members):
        return 130
    return int(any(m.status != 'COMPLETED' for m in members))


class Driver:
    """Submits members whose dependencies completed, at most --jobs at a time, and collects their outcome."""

    def __init__(self, name: str, sweep_id: str, url: str, args, folder: Path, pool, recorded: list,
                 claims: Claims | None = None):
        self.name, self.sweep_id, self.url, self.args, self.folder, self.pool = name, sweep_id, url, args, folder, pool
        self.recorded = recorded  # the sweep's runs before this invocation
        self.claims = claims  # None: this driver is the only one (tests)
        self.env = {'OMP_NUM_THREADS': str(pool.threads), 'MKL_NUM_THREADS': str(pool.threads),
                    'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])),
                    'HF_HUB_OFFLINE': os.environ.get('HF_HUB_OFFLINE', '1'),
                    'HF_DATASETS_OFFLINE': os.environ.get('HF_DATASETS_OFFLINE', '1')}
        self.bar = None

    def run(self, members: list[Member]) -> None:
        from tqdm import tqdm
        pending, running = list(members), {}
        self.members = members
        self.bar = tqdm(total=len(members), desc=f'sweep {self.name}', unit='run', file=sys.stderr)
        try:
            while pending or running:
                self.submit_ready(pending, running)
                if running:
                    done, _ = wait(running, timeout=BEAT_EVERY, return_when=FIRST_COMPLETED)
                    if self.claims is not None:
                        self.claims.beat()
                    for f in done:
                        self.collect(running.pop(f), f)
        except KeyboardInterrupt:  # members got the same SIGINT: they record INTERRUPTED and leave a resume point
            self.bar.write('interrupted: waiting for the running members to record INTERRUPTED ...', file=sys.stderr)
            for f, m in running.items():
                self.collect(m, f)
            for m in pending:
                m.status = 'NOT STARTED'
        finally:
            self.bar.close()

    def submit_ready(self, pending: list[Member], running: dict) -> None:
        """Start the pending members whose dependencies completed (up to --jobs running); skip those whose
        dependencies did not."""
        for m in list(pending):
            if len(running) >= self.args.jobs:
                break
            failed = [d for d in m.deps.values() if d.status not in ('COMPLETED', 'PENDING')]
            if failed:
                pending.remove(m)
                self.finish(m, 'SKIPPED', f'({failed[0].label} did not complete)')
            elif all(d.status == 'COMPLETED' for d in m.deps.values()):
                pending.remove(m)
                future = self.start(m)
                if future is not None:
                    running[future] = m

    def finish(self, m: Member, status: str, note: str = '') -> None:
        m.status, m.note = status, note
        if self.claims is not None:
            self.claims.release(m.key())
        self.bar.update(1)
        self.bar.set_postfix(failed=sum(x.status not in ('COMPLETED', 'PENDING') for x in self.members))
        run = f' (run {m.run_id})' if m.run_id else ''
        self.bar.write(f'{m.label}: {status}{run}' + (f' {note}' if note else ''), file=sys.stderr)

    def start(self, m: Member):
        """Compile the member with its dependencies' run ids, then skip, resume or start it. -> a future or None."""
        try:
            spec = compile_member(m)
        except UserError as e:  # checked with stand-in ids before anything ran; a real id cannot break it
            self.finish(m, 'REFUSED', str(e).splitlines()[0])
            return None
        m.hash = spec.hash
        recorded = self.recorded
        if self.claims is not None:
            holder = self.claims.take(m.key())
            if holder is not None:
                self.finish(m, 'RUNNING', f'(claimed by sweep {holder}, which runs it: not started here; rerun the '
                                          'sweep once that one ended)')
                return None
            recorded = records(self.url, self.name)  # now: another driver may have run it since this one started
        before = prior(m, recorded)
        if before is not None:
            m.run_id, m.run_name = before.id, before.name
        if before is not None and before.status == 'COMPLETED':
            m.start, m.stop, m.before = before.start, before.stop, True
            self.finish(m, 'COMPLETED', '(recorded before: skipped)')
            return None
        silent = None if before is None else before.silent_for()
        if silent is not None and silent < database.STALE_AFTER:
            self.finish(m, 'RUNNING', f'(in another process, its last heartbeat {database.span(silent)} ago: not '
                                      'started here; rerun the sweep once it ended)')
            return None
        argv = [*m.specs]
        for b in m.resolved():
            argv += ['-b', b]
        if self.args.db:
            argv += ['--db', self.args.db]
        if resumable(before, spec.plan.run.out_dir):
            m.resume = before.name
            argv += ['--resume', before.name]
        else:
            m.run_id = m.run_name = None
        entry = {'name': self.name, 'sweep_id': self.sweep_id, 'trial': m.trial, 'seed': m.seed,
                 'grid': stored(m.point)}
        argv += ['--sweep-member', json.dumps(entry)]
        shown = shlex.join(['python', '-m', 'runtime.run',
                            *[database.display_url(a) if a == self.args.db else a for a in argv]])
        return self.pool.start(argv, self.env, str(self.folder / f'{m.label}.log'), os.getcwd(), shown)

    def collect(self, m: Member, future) -> None:
        try:
            result = future.result()
        except Exception as e:  # noqa: BLE001  (a submitit job that died: its own log says why)
            self.finish(m, 'FAILED', f'(the job failed: {database.first_line(e)})')
            return
        m.start, m.stop = (dt.datetime.fromtimestamp(result[k]) for k in ('start', 'stop'))
        code = result['code']
        if m.run_id is None:  # a new run: the id it was recorded under
            found = [r for r in records(self.url, self.name, self.sweep_id) if _identity(r) == m.key()]
            if found:
                m.run_id, m.run_name = found[-1].id, found[-1].name
        status = {0: 'COMPLETED', 2: 'REFUSED', 130: 'INTERRUPTED'}.get(code, 'FAILED')
        self.finish(m, status, '' if code in (0, 2, 130) else f'(exit {code})')


def summary(members: list[Member]) -> str:
    """The table of a sweep's members; wall = the member's process here, or its recorded run when it was not run."""
    rows = [[m.trial, str(m.seed), m.grid_text, m.run_id or '-', m.status + ' (before)' * m.before
             + ' (resumed)' * bool(m.resume and m.status == 'COMPLETED'), duration(m.start, m.stop) or '-']
            for m in members]
    return table(['trial', 'seed', 'grid', 'run', 'status', 'wall'], rows, right={1, 3, 5})
