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
import collections
import errno
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.pop('WORLD_SIZE', None)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)
import runtime.run  # noqa: E402,F401  (imported once here: every forked run starts with torch, sacred, zarr loaded)
from runtime.tracking import WALL_CLOCK  # noqa: E402
from store import memories as _memories  # noqa: E402,F401

SPEC = 'specs/frozen_encoder_curriculum.gin'
STAGES = ('autoencode', 'blank_copy')
BINDINGS = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'BATCH=4', 'Stage.eval_every=2', 'Run.eval_batches=1',
            'Run.checkpoint_every=2', 'Run.log_every=1', 'autoencode/Stage.steps=3', 'blank/Stage.steps=3',
            'Plan.curriculum = [@autoencode/Stage(), @blank/Stage()]']
PG_DEFAULT = 'postgresql://memspec:memspec@localhost:5432/postgres'
RUN_TIMEOUT = 600

# hook -> phases at which it can act; categories of kill points
HOOKS = {
    'step': ('begin',), 'eval': ('begin',),
    'ckpt_write': ('begin', 'torn', 'written', 'renamed'), 'torch_save': ('torn',),
    'zarr_open': ('done',), 'zarr_append': ('begin', 'torn', 'done'), 'zarr_close': ('begin', 'done'),
    'zarr_delete': ('torn',),  # only a resumed run replaces a group: not drawn from the baseline's counts
    'db_commit': ('before', 'after'),
}
CATEGORIES = {'mid-step': ('step', 'eval'), 'checkpoint write': ('ckpt_write', 'torch_save'),
              'zarr append': ('zarr_open', 'zarr_append', 'zarr_close'), 'database write': ('db_commit',)}


def argv_for(out_dir: Path, cache: Path, extra=(), bindings=()) -> list[str]:
    argv = [SPEC, '-b', f"Run.out_dir='{out_dir}'", '-b', f"Data.cache_dir='{cache}'"]
    for b in list(BINDINGS) + list(bindings):
        argv += ['-b', b]
    return argv + list(extra)


class Payload:
    """What a crafted checkpoint holds: unpickling it opens (creates) a file, the side effect a code-execution
    payload would have. torch.load(weights_only=True) must refuse it unread."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def M_listing(store):
    from store import memories as M
    return M.listing(store)


# ----------------------------------------------------------------------------------------- in the forked run
_counts: collections.Counter = collections.Counter()
_lock = threading.Lock()
_spec: dict | None = None
_db_down = threading.Event()


def _tick(name: str, path=None) -> bool:
    """Count a call of hook `name`; True when it is the call the fault spec targets (the k-th call, or, when the spec
    names a 'file', the k-th call that writes a file of that name: independent of the run's other writes)."""
    with _lock:
        _counts[name] += 1
        if _spec is None or _spec['hook'] != name:
            return False
        if _spec.get('file'):
            if path is None or Path(path).name != _spec['file']:
                return False
            _counts[f"{name}:{_spec['file']}"] += 1
            return _counts[f"{name}:{_spec['file']}"] == _spec['k']
        return _counts[name] == _spec['k']


def _act(filename=None) -> None:
    action = _spec['action']
    if action == 'kill':
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if action == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename) if filename else None)
    if action == 'db_down':
        _db_down.set()
    if action == 'pg_down':
        _pg_block(_spec['admin'], _spec['database'])
        _db_down.set()
    if action == 'pause':  # a live run, held here: the suite resumes it meanwhile, or sends it a real SIGTERM
        Path(_spec['ready']).write_text(str(os.getpid()))
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            time.sleep(0.05)
    if action == 'fill':
        fill_disk(Path(_spec['path']))


def fill_disk(folder: Path) -> None:
    """Fill the filesystem holding `folder` to the last byte (a real full disk: every later write fails there)."""
    with open(folder / 'filler', 'ab', buffering=0) as f:  # unbuffered: nothing is left to flush when it closes
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b'\0' * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def _at(hit: bool, phase: str, filename=None) -> None:
    if hit and _spec['phase'] == phase:
        _act(filename)


def _pg_block(admin_url: str, database: str, allow: bool = False) -> None:
    """Make a PostgreSQL database refuse new connections and end its sessions (the database 'goes away'), or
    allow connections again."""
    import psycopg2
    con = psycopg2.connect(admin_url, connect_timeout=10)
    con.autocommit = True
    try:
        with con.cursor() as cur:
            cur.execute(f'ALTER DATABASE {database} ALLOW_CONNECTIONS {"true" if allow else "false"}')
            if not allow:
                cur.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                            'WHERE datname = %s AND pid <> pg_backend_pid()', (database,))
    finally:
        con.close()


def install_hooks(spec: dict | None) -> None:
    """Patch the hooks (in a forked run only). With spec None they only count calls."""
    global _spec
    _spec = spec
    import sqlalchemy.engine.default as D
    import zarr

    import runtime.train as T
    import store.files as C
    from store import memories as M

    # Each hook replaces the function where it is defined; the runtime calls these through their modules, and the
    # baseline run checks that every hook is reached (Suite.baseline), so a refactor cannot silently bypass one.
    real_stage_loss, real_evaluate, real_atomic_write, real_save = T.stage_loss, T.evaluate, C.atomic_write, torch.save

    def stage_loss(*a, **kw):
        _at(_tick('step'), 'begin')
        return real_stage_loss(*a, **kw)

    def evaluate(*a, **kw):
        _at(_tick('eval'), 'begin')
        return real_evaluate(*a, **kw)

    def atomic_write(path, write):
        hit = _tick('ckpt_write', path)
        if not hit or _spec['action'] in ('fill', 'pause'):  # these act, then the real write proceeds (or fails)
            _at(hit, 'begin', path)
            return real_atomic_write(path, write)
        _at(hit, 'begin', path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
        os.close(fd)
        write(tmp)
        if _spec['phase'] == 'torn':
            os.truncate(tmp, os.path.getsize(tmp) // 2)
            _act(path)
        os.chmod(tmp, C.file_mode())  # as the real atomic_write does before its rename
        _at(hit, 'written', path)
        os.replace(tmp, path)
        _at(hit, 'renamed', path)

    def save(obj, f, *a, **kw):
        hit = _tick('torch_save')
        if hit and _spec['phase'] == 'torn' and isinstance(f, (str, os.PathLike)):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            with open(f, 'wb') as out:
                out.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            _act(f)
        return real_save(obj, f, *a, **kw)

    real_init, real_append, real_close = M.Writer.__init__, M.Writer.append, M.Writer.close

    def init(self, *a, **kw):
        hit = _tick('zarr_open')
        real_init(self, *a, **kw)
        _at(hit, 'done')

    def append(self, memories, tokens, mask):
        hit = _tick('zarr_append')
        _at(hit, 'begin')
        if hit and _spec['phase'] == 'torn':  # the memories array takes its rows, tokens and mask do not
            k = len(memories)
            sl = slice(self.rows, self.rows + k)
            self.mem[sl] = M._bf16_bits(memories) if self.dtype == 'bfloat16' else memories.detach().float().numpy()
            _act(f'{self.group.store_path}/memories')
        real_append(self, memories, tokens, mask)
        _at(hit, 'done')

    real_delitem = zarr.Group.__delitem__

    def delitem(self, key):
        hit = _tick('zarr_delete')
        if hit and _spec['phase'] == 'torn':  # a kill in the middle of the recursive delete: the group's own
            group = Path(str(self.store.root)) / self.path / key  # metadata and half of its other files gone
            files = sorted(p for p in group.rglob('*') if p.is_file() and p != group / 'zarr.json')
            random.Random(_spec['k']).shuffle(files)
            for f in [group / 'zarr.json'] + files[:len(files) // 2]:
                f.unlink(missing_ok=True)
            _act()
        return real_delitem(self, key)

    def close(self):
        hit = _tick('zarr_close')
        _at(hit, 'begin')
        real_close(self)
        _at(hit, 'done')

    real_commit, real_execute, real_executemany = (D.DefaultDialect.do_commit, D.DefaultDialect.do_execute,
                                                   D.DefaultDialect.do_executemany)

    def down():
        if _db_down.is_set():
            raise sqlite3.OperationalError('unable to open database file (the database went away: simulated)')

    def do_commit(self, dbapi_connection):
        hit = _tick('db_commit')
        _at(hit, 'before')
        down()
        real_commit(self, dbapi_connection)
        _at(hit, 'after')

    def do_execute(self, cursor, statement, parameters, context=None):
        down()
        return real_execute(self, cursor, statement, parameters, context)

    def do_executemany(self, cursor, statement, parameters, context=None):
        down()
        return real_executemany(self, cursor, statement, parameters, context)

    T.stage_loss, T.evaluate, C.atomic_write, torch.save = stage_loss, evaluate, atomic_write, save
    M.Writer.__init__, M.Writer.append, M.Writer.close = init, append, close
    zarr.Group.__delitem__ = delitem
    D.DefaultDialect.do_commit = do_commit
    if spec is not None and spec['action'] == 'db_down':  # PostgreSQL's own failure needs no simulation
        D.DefaultDialect.do_execute, D.DefaultDialect.do_executemany = do_execute, do_executemany


def _child(argv, spec, log: Path, counts: Path | None, start_at: float | None, module: str = 'runtime.run'):
    paths = log if isinstance(log, tuple) else (log,)  # (stdout, stderr), or one log for both
    for targets, path in zip(((1,), (2,)) if len(paths) == 2 else ((1, 2),), paths):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for target in targets:
            os.dup2(fd, target)
        os.close(fd)
    code = 1
    try:
        install_hooks(spec)
        if start_at is not None:  # concurrent runs: start together
            time.sleep(max(0.0, start_at - time.time()))
        import importlib
        importlib.import_module(module).main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001  (what a user would see as a traceback)
        traceback.print_exc()
        code = 1
    finally:
        try:
            if counts is not None:
                counts.write_text(json.dumps(dict(_counts)))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork_run(argv, log: Path, spec: dict | None = None, counts: Path | None = None, start_at=None,
             module: str = 'runtime.run') -> int:
    """Run <module>.main(argv) (runtime.run by default) in a forked copy of this process (torch and the runtime
    already imported); -> its exit code, or -signal when it was killed."""
    pid = spawn(argv, log, spec, counts, start_at, module)
    return wait(pid)


def spawn(argv, log, spec=None, counts=None, start_at=None, module: str = 'runtime.run') -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(argv, spec, log, counts, start_at, module)
    return pid


def wait(pid: int, timeout: float = RUN_TIMEOUT) -> int:
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------- what a run left behind
def db_path(out_dir: Path) -> Path:
    return out_dir / 'sacred.db'


def query(db, sql, *args):
    if isinstance(db, str):  # a PostgreSQL URL
        import psycopg2
        con = psycopg2.connect(db, connect_timeout=10)
        try:
            with con.cursor() as cur:
                cur.execute(sql.replace('?', '%s'), args)
                return cur.fetchall()
        finally:
            con.close()
    if not Path(db).is_file():
        return []
    con = sqlite3.connect(db, timeout=600)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # no such table: nothing recorded
        return []
    finally:
        con.close()


def run_key(db, run_id) -> str | None:
    """The run key recorded with a run (Sacred info.run_key)."""
    rows = query(db, 'SELECT info FROM run WHERE run_id = ?', str(run_id))
    try:
        return json.loads(rows[0][0] or '{}').get('run_key') if rows else None
    except ValueError:
        return None


def run_dir(out_dir: Path, run_id, db=None) -> Path:
    """The folder of run `run_id` under out_dir, <id>-<key> (store/layout.py): the key from the run's record in `db`,
    else the one folder of that id (<out_dir>/<id>-? when there is none)."""
    key = run_key(db, run_id) if db is not None else None
    if key:
        return Path(out_dir) / f'{run_id}-{key}'
    found = sorted(Path(out_dir).glob(f'{run_id}-*'))
    return found[0] if len(found) == 1 else Path(out_dir) / f'{run_id}-?'


def bad_modes(folder: Path) -> list[str]:
    """Files and folders under `folder` whose permissions are not what the umask gives (mkstemp's 0600 would keep
    other users from resuming or generating)."""
    mask = os.umask(0o022)
    os.umask(mask)
    out = []
    for p in [folder, *folder.rglob('*')] if folder.is_dir() else []:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        if p.stat().st_mode & 0o777 != want:
            out.append(f'{p.relative_to(folder.parent)} {oct(p.stat().st_mode & 0o777)}')
    return out


def record_of(db, out_dir: Path, run_id: str, store: Path | None = None) -> dict:
    """Everything that should match the baseline, from the run folder, the database and the Zarr store."""
    from safetensors.torch import load_file

    from store import memories as M
    d = run_dir(out_dir, run_id, db)
    rec = {'name': d.name,
           'summary': json.loads((d / 'summary.json').read_text()) if (d / 'summary.json').is_file() else None,
           'final': load_file(d / 'final.safetensors') if (d / 'final.safetensors').is_file() else None,
           'stages': {p.stem: load_file(p) for p in sorted((d / 'stages').glob('*.safetensors'))},
           'runs': query(db, 'SELECT run_id, status FROM run ORDER BY id'),
           'metrics': query(db, 'SELECT name, step, value FROM memspec_metrics WHERE run_id = ? '
                                'ORDER BY name, step, id', run_id),
           'artifacts': sorted(r[0] for r in query(db, 'SELECT filename FROM artifact WHERE run_id = ?', run_id)),
           'row': (query(db, 'SELECT info, result FROM run WHERE run_id = ?', run_id) or [(None, None)])[0]}
    store = store or out_dir / 'memories.zarr'
    rec['zarr'] = {}
    for g in M.listing(store):
        entry = dict(g)
        if g['complete']:
            grp = M.open_group(store, g['run'], g['stage'])
            entry['arrays'] = {k: torch.from_numpy(getattr(grp, k)[:].copy()) for k in ('memories', 'tokens', 'mask')}
            entry['step'] = grp.attrs.get('step')
        rec['zarr'][(g['run'], g['stage'])] = entry
    rec['modes'] = bad_modes(d) + bad_modes(Path(store) / d.name)
    rec['temporaries'] = (sorted(str(p.relative_to(d)) for p in list(d.glob('.*')) + list(d.glob('stages/.*')))
                          if d.is_dir() else [])
    ck = d / 'checkpoint.pt'
    import runtime.checkpoint as R
    if ck.is_file():
        side = ck.with_name('checkpoint.pt.sha256')
        rec['checkpoint_ok'] = side.is_file() and R.sha256_file(ck) in side.read_text().split()
    else:
        rec['checkpoint_ok'] = False
    return rec


def compare(rec: dict, base: dict, run_id: str, base_id: str) -> tuple[list[str], dict, dict]:
    """-> (problems, records lost by kind, records duplicated by kind)."""
    problems, lost, dup = [], collections.Counter(), collections.Counter()
    if rec['summary'] != base['summary']:
        problems.append(f"summary.json differs: {rec['summary'] and sorted(rec['summary'])} "
                        f"vs {sorted(base['summary'])}"
                        if rec['summary'] is None or set(rec['summary']) != set(base['summary']) else
                        'summary.json values differ: '
                        + ', '.join(f'{s}.{k}' for s in base['summary'] for k in base['summary'][s]
                                    if rec['summary'][s].get(k) != base['summary'][s][k])[:300])
    for name, got, want in [('final.safetensors', rec['final'], base['final'])] + \
            [(f'stages/{s}.safetensors', rec['stages'].get(s), w) for s, w in base['stages'].items()]:
        if got is None:
            problems.append(f'{name} missing')
        elif got.keys() != want.keys() or any(not torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want):
            problems.append(f'{name} differs from the uninterrupted run')
    if set(rec['stages']) != set(base['stages']):
        problems.append(f"stage files {sorted(rec['stages'])} vs {sorted(base['stages'])}")
    # the database: one run, COMPLETED
    if rec['runs'] != [(run_id, 'COMPLETED')]:
        problems.append(f"run table holds {rec['runs']} (want one row ({run_id!r}, 'COMPLETED'))")
        ids = [r for r in rec['runs'] if r[0] == run_id]
        lost['run rows'] += not ids
        dup['run rows'] += max(0, len(rec['runs']) - 1)
    want = collections.Counter((n, s) for n, s, _ in base['metrics'])
    got = collections.Counter((n, s) for n, s, _ in rec['metrics'])
    missing, extra = want - got, got - want
    if missing or extra:
        problems.append(f'metrics: {sum(missing.values())} rows lost {sorted(missing)[:4]}, '
                        f'{sum(extra.values())} duplicated {sorted(extra)[:4]}')
    lost['metric rows'] += sum(missing.values())
    dup['metric rows'] += sum(extra.values())
    if not missing and not extra:
        bad = [(n, s) for (n, s, a), (_, _, b) in zip(rec['metrics'], base['metrics'])
               if abs(a - b) > 1e-6 and n not in WALL_CLOCK]  # throughput measures the machine, not the run
        if bad:
            problems.append(f'metric values differ at {bad[:4]}')
    ra, rb = collections.Counter(rec['artifacts']), collections.Counter(base['artifacts'])
    if ra != rb:
        problems.append(f"artifacts {sorted(rec['artifacts'])} vs {sorted(base['artifacts'])}")
        lost['artifacts'] += sum((rb - ra).values())
        dup['artifacts'] += sum((ra - rb).values())
    info = json.loads(rec['row'][0] or '{}') if rec['row'][0] else {}
    base_info = json.loads(base['row'][0] or '{}')
    if info.get('stages') != base_info.get('stages'):
        problems.append(f"run info stages {info.get('stages')} vs {base_info.get('stages')}")
        lost['stage end steps'] += len(set(base_info.get('stages') or {}) - set(info.get('stages') or {}))
    if rec['row'][1] != base['row'][1]:
        problems.append(f"result {rec['row'][1]} vs {base['row'][1]}")
    # the Zarr store: exactly the baseline's groups, complete, same rows
    name = rec['name']
    base_groups = {stage: g for (rid, stage), g in base['zarr'].items() if rid == base['name']}
    for (rid, stage), g in rec['zarr'].items():
        if rid != name or stage not in base_groups:
            problems.append(f'zarr: unexpected group {rid}/{stage}')
            dup['zarr rows'] += g['rows']
    for stage, bg in base_groups.items():
        g = rec['zarr'].get((name, stage))
        if g is None or not g['complete']:
            problems.append(f"zarr: group {name}/{stage} {'missing' if g is None else 'torn (incomplete)'}")
            lost['zarr rows'] += bg['rows']
            continue
        if g['rows'] != bg['rows'] or g['shape'] != bg['shape']:
            problems.append(f"zarr: {name}/{stage} has {g['rows']} rows {g['shape']} "
                            f"(want {bg['rows']} {bg['shape']})")
            lost['zarr rows'] += max(0, bg['rows'] - g['rows'])
            dup['zarr rows'] += max(0, g['rows'] - bg['rows'])
            continue
        for k, a in bg['arrays'].items():
            b = g['arrays'][k]
            if a.shape != b.shape or not (torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6)):
                problems.append(f'zarr: {name}/{stage}/{k} differs from the uninterrupted run')
        if g['step'] != bg['step']:
            problems.append(f"zarr: {name}/{stage} step attribute {g['step']} vs {bg['step']}")
    if not rec['checkpoint_ok']:
        problems.append('checkpoint.pt does not verify against checkpoint.pt.sha256')
    if rec['temporaries']:
        problems.append(f"temporary files left: {rec['temporaries']}")
    if rec['modes']:
        problems.append(f"files other users cannot read (not the umask's mode): {rec['modes'][:4]}")
    return problems, dict(lost), dict(dup)


def recorded_ids(db) -> list[str]:
    return [r[0] for r in query(db, 'SELECT run_id FROM run ORDER BY id')]


def stderr_problems(text: str, code: int, want_code: int, needles=(), errors: int | None = None) -> list[str]:
    """What is wrong with a command's output: exit code, a traceback, not exactly one 'error:' message (`errors`: how
    many instead), a needle missing."""
    out = []
    if code != want_code:
        out.append(f'exit {code} (want {want_code})')
    if 'Traceback' in text:
        out.append('a traceback was printed')
    errors = (1 if want_code else 0) if errors is None else errors
    if (want_code or errors) and text.count('error:') != errors:
        out.append(f"{text.count('error:')} 'error:' messages (want {errors})")
    for n in needles:
        if n not in text:
            out.append(f'{n!r} not in the message')
    return out


def error_message(text: str) -> str:
    """The last `error: ...` line of a run's output and the indented lines after it (the fix)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if 'error:' in line]
    if not starts:
        return ''
    first = lines[starts[-1]]
    out = [first[first.index('error:'):]]
    for line in lines[starts[-1] + 1:]:
        if not line.startswith('  '):
            break
        out.append(line)
    return '\n'.join(out)


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors='replace')[-n:]
    except OSError:
        return ''


# ----------------------------------------------------------------------------------------- scenarios
class Suite:
    def __init__(self, root: Path, cache: Path, seed: int, postgres: str | None = None):
        self.root, self.cache, self.seed, self.postgres = root, cache, seed, postgres
        self.base_dir = root / 'baseline'
        self.base = None
        self.counts: dict = {}

    def warm_up(self) -> float:
        """One plain run in this process before anything is forked: the data cache is built and every lazy import and
        first-call cost is paid once (a forked run then takes ~1 s instead of ~3 s). Threads it leaves (zarr's event
        loop) are stopped so that forks copy a single-threaded process."""
        import contextlib
        import gc

        import tqdm
        import zarr.core.sync

        import runtime.run as R
        tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread, here or in the forks
        t0 = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                R.main(argv_for(self.root / 'warm-up', self.cache))
        except SystemExit as e:
            raise SystemExit(f'the warm-up run failed (exit {e.code}):\n{log.getvalue()[-4000:]}')
        gc.collect()
        zarr.core.sync.cleanup_resources()
        import logging
        for h in list(logging.getLogger().handlers):  # Sacred's basicConfig bound them to the captured stream above
            logging.getLogger().removeHandler(h)
        shutil.rmtree(self.root / 'warm-up', ignore_errors=True)
        return round(time.perf_counter() - t0, 2)

    def baseline(self) -> dict:
        t0 = time.perf_counter()
        code = fork_run(argv_for(self.base_dir, self.cache), self.root / 'baseline.log', None,
                        self.root / 'counts.json')
        if code != 0:
            raise SystemExit(f'the baseline run failed (exit {code}):\n{tail(self.root / "baseline.log", 4000)}')
        self.counts = json.loads((self.root / 'counts.json').read_text())
        unreached = [h for h in HOOKS if h != 'zarr_delete' and not self.counts.get(h)]
        if unreached:  # a hook nobody calls injects nothing: every scenario using it would pass vacuously
            raise SystemExit(f'the baseline run never reached the hook(s) {unreached}: the runtime no longer calls the '
                             'patched function (install_hooks names what it replaces)')
        return {'seconds': round(time.perf_counter() - t0, 2), 'counts': self.counts}

    def base_record(self) -> dict:
        if self.base is None:
            (self.base_id,) = recorded_ids(db_path(self.base_dir))
            self.base = record_of(db_path(self.base_dir), self.base_dir, self.base_id)
            self.base_name = self.base['name']
        return self.base

    def plan_kills(self, n: int) -> list[dict]:
        rng = random.Random(self.seed)
        cats = list(CATEGORIES)
        points = []
        for i in range(n):
            cat = cats[(i + self.seed) % len(cats)]
            hooks = [h for h in CATEGORIES[cat] if self.counts.get(h)]
            specs = []
            for _ in range(2 if rng.random() < 0.25 else 1):  # sometimes the resumed run is killed too
                hook = rng.choice(hooks)
                specs.append({'hook': hook, 'phase': rng.choice(HOOKS[hook]), 'k': rng.randint(1, self.counts[hook]),
                              'action': 'kill'})
                hooks = [h for c in CATEGORIES.values() for h in c if self.counts.get(h)]
            points.append({'id': f'kill{i:02d}', 'kind': 'kill', 'category': cat, 'hooks': specs})
        return points

    def finish(self, out: Path, name: str, resume_id: str | None, extra=(), db=None,
               log: Path | None = None) -> tuple[int, str | None]:
        """Resume (or, when nothing was recorded, rerun) until done -> (exit code, run id). `extra`: more arguments
        (--db), `db` the database they name (default <out>/sacred.db)."""
        more = ['--resume', resume_id] if resume_id is not None else []
        code = fork_run(argv_for(out, self.cache, list(extra) + more), log or out / f'{name}.log')
        ids = recorded_ids(db or db_path(out))
        return code, resume_id if resume_id is not None else (ids[-1] if ids else None)

    def check(self, out: Path, run_id: str | None, db=None) -> tuple[list[str], dict, dict]:
        base = self.base_record()
        if run_id is None:
            return ['no run was recorded'], {'run rows': 1}, {}
        return compare(record_of(db or db_path(out), out, run_id), base, run_id, self.base_id)

    def kill_point(self, point: dict) -> dict:
        out = self.root / point['id']
        res = dict(point, killed=0, survived=False, problems=[], lost={}, duplicated={})
        t0 = time.perf_counter()
        run_id, code = None, None
        for j, spec in enumerate(point['hooks']):
            extra = ['--resume', run_id] if run_id is not None else []
            code = fork_run(argv_for(out, self.cache, extra), self.log(out, f'run{j}'), spec)
            ids = recorded_ids(db_path(out))
            if run_id is None and ids:
                run_id = ids[0]
            if code == -signal.SIGKILL:
                res['killed'] += 1
            elif code != 0:
                res['problems'].append(f'run {j} exited {code}: {tail(self.log(out, f"run{j}"), 600)}')
                break
            else:
                break  # finished before the k-th call (the count varies slightly with timing): nothing to resume
        if not res['killed']:
            res['note'] = 'the hook was not reached; no fault injected'
        if not res['problems']:
            if code != 0:
                code, run_id = self.finish(out, 'resume', run_id)
                if code != 0:
                    res['problems'].append(f'resume exited {code}: {tail(out / "resume.log", 800)}')
            if code == 0:
                text = (out / 'resume.log').read_text(errors='replace') if (out / 'resume.log').is_file() else ''
                if 'Traceback' in text:
                    res['problems'].append('the resumed run printed a traceback')
                p, lost, dup = self.check(out, run_id)
                res['problems'] += p
                res['lost'], res['duplicated'] = lost, dup
        res['run_id'] = run_id
        res['survived'] = not res['problems']
        res['seconds'] = round(time.perf_counter() - t0, 2)
        return res

    @staticmethod
    def log(out: Path, name: str) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return out / f'{name}.log'

    # ------------------------------------------------------------------ resource faults
    def fault_disk_full(self, fid: str, hook: str, phase: str, k: int) -> dict:
        """ENOSPC at the k-th call of `hook`: exit 1 with one message, the last checkpoint intact, then resume."""
        out = self.root / fid
        res = {'id': fid, 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        spec = {'hook': hook, 'phase': phase, 'k': k, 'action': 'enospc'}
        code = fork_run(argv_for(out, self.cache), self.log(out, 'full'), spec)
        text = tail(self.log(out, 'full'), 100000)
        res['problems'] += stderr_problems(text, code, 1, ('No space left on device', '--resume', 'intact'))
        res['message'] = error_message(text)
        (run_id,) = recorded_ids(db_path(out)) or [None]
        d = run_dir(out, run_id)
        ck = d / 'checkpoint.pt'
        import runtime.checkpoint as R
        if ck.is_file():
            side = ck.with_name('checkpoint.pt.sha256')
            if not (side.is_file() and R.sha256_file(ck) in side.read_text().split()[:1]):
                res['problems'].append('the previous checkpoint does not verify after the failed write')
            state = torch.load(ck, weights_only=True)
            res['checkpoint_left'] = {'stage': state['stage'], 'step': state['step']}
        temps = sorted(p.name for p in list(d.glob('.*')) + list(d.glob('stages/.*')))
        if temps:
            res['problems'].append(f'temporary files left after the failed write: {temps}')
        if hook.startswith('zarr'):
            from store import memories as M
            torn = [g for g in M.listing(out / 'memories.zarr') if not g['complete']]
            if not torn:
                res['problems'].append('the interrupted memory group is not marked incomplete')
            else:
                try:
                    M.open_group(out / 'memories.zarr', torn[0]['run'], torn[0]['stage'])
                    res['problems'].append('a reader opened the half-written memory group')
                except Exception as e:  # noqa: BLE001
                    if type(e).__name__ != 'SpecError':
                        res['problems'].append(f'reading the half-written group raised {type(e).__name__}, '
                                               'not a clear error')
        return self.resume_and_check(out, res, run_id)

    def resume_and_check(self, out: Path, res: dict, run_id, what: str = 'resume', extra=(), db=None,
                         log: Path | None = None) -> dict:
        """The end of every fault scenario: --resume, then compare with the uninterrupted baseline."""
        log = log or out / 'resume.log'
        code, run_id = self.finish(out, 'resume', run_id, extra, db, log)
        if code != 0:
            res['problems'].append(f'{what} exited {code}: {tail(log, 800)}')
        else:
            p, res['lost'], res['duplicated'] = self.check(out, run_id, db)
            res['problems'] += p
        res['survived'] = not res['problems']
        return res

    def fault_unwritable_out_dir(self) -> dict:
        out = self.root / 'unwritable'
        out.mkdir(parents=True, exist_ok=True)
        res = {'id': 'unwritable_out_dir', 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        blocker = out / 'a-file'
        blocker.write_text('not a folder\n')
        code = fork_run(argv_for(blocker / 'runs', self.cache), out / 'file.log')
        res['problems'] += stderr_problems(tail(out / 'file.log', 100000), code, 2, ('cannot write', 'Run.out_dir'))
        if blocker.read_text() != 'not a folder\n':
            res['problems'].append('the file in the way was changed')
        # a folder without write permission (root ignores permissions: then the permission error is simulated)
        locked = out / 'locked'
        locked.mkdir(exist_ok=True)
        if os.geteuid() != 0:
            os.chmod(locked, 0o555)
            spec = None
        else:
            spec = {'hook': 'none', 'phase': '', 'k': 0, 'action': 'eacces', 'path': str(locked)}
        try:
            code = self._fork_eacces(argv_for(locked / 'runs', self.cache), out / 'locked.log', spec)
        finally:
            os.chmod(locked, 0o755)
        res['problems'] += stderr_problems(tail(out / 'locked.log', 100000), code, 2,
                                           ('cannot write', 'Permission denied'))
        if any(locked.iterdir()):
            res['problems'].append(f'something was written under the unwritable folder: {list(locked.iterdir())}')
        res['message'] = error_message(tail(out / 'locked.log', 100000))
        res['survived'] = not res['problems']
        return res

    def _fork_eacces(self, argv, log, spec):
        if spec is None:
            return fork_run(argv, log)
        pid = os.fork()
        if pid == 0:
            locked = spec['path']
            real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp

            def mkdir(self, *a, **kw):
                if str(self).startswith(locked + '/'):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
                return real_mkdir(self, *a, **kw)

            def mkstemp(*a, dir=None, **kw):
                if dir is not None and str(dir).startswith(locked):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
                return real_mkstemp(*a, dir=dir, **kw)
            Path.mkdir, tempfile.mkstemp = mkdir, mkstemp
            _child(argv, None, log, None, None)
        return wait(pid)

    def fault_db_unreachable(self) -> dict:
        res = {'id': 'db_unreachable_at_start', 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        out = self.root / 'db_unreachable'
        blocker = self.root / 'db_unreachable-file'
        blocker.write_text('x\n')
        for name, url in (('postgresql', 'postgresql://nobody@127.0.0.1:1/x'), ('sqlite', f'sqlite:///{blocker}/sacred.db')):
            code = fork_run(argv_for(out / name, self.cache, ['--db', url]), self.root / f'db_unreachable-{name}.log')
            text = tail(self.root / f'db_unreachable-{name}.log', 100000)
            res['problems'] += [f'{name}: {p}'
                                for p in stderr_problems(text, code, 2, ('cannot open the run database', url))]
            left = [p.name for p in (out / name).iterdir() if p.name not in ('cache',)] if (out / name).is_dir() else []
            if left:
                res['problems'].append(f'{name}: left {left} behind')
        res['survived'] = not res['problems']
        return res

    def fault_db_gone(self, fid: str, spec: dict, needles) -> dict:
        """SQLite: from the hook in `spec` on, every statement fails (the database went away). Mid-run the run must
        stop before its next checkpoint; after the last checkpoint it must say that its status is not recorded
        (exit 1, one message either way). Resumed, it must record everything."""
        out = self.root / fid
        res = {'id': fid, 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        code = fork_run(argv_for(out, self.cache), self.log(out, 'gone'), dict(spec, action='db_down'))
        text = tail(self.log(out, 'gone'), 100000)
        res['problems'] += stderr_problems(text, code, 1, needles)
        res['message'] = error_message(text)
        (run_id,) = recorded_ids(db_path(out)) or [None]
        return self.resume_and_check(out, res, run_id)

    def fault_pg_gone(self, k: int = 4) -> dict:
        """PostgreSQL for real: a fresh database that stops accepting connections mid-run (sessions terminated)."""
        import psycopg2
        from sqlalchemy.engine import make_url
        res = {'id': 'postgres_gone_midrun', 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        name = f'memspec_rel_{os.getpid()}_{random.randrange(1 << 30)}'
        admin = psycopg2.connect(self.postgres, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE {name}')
        url = make_url(self.postgres).set(database=name).render_as_string(hide_password=False)
        out = self.root / 'pg_gone'
        try:
            spec = {'hook': 'step', 'phase': 'begin', 'k': k, 'action': 'pg_down', 'admin': self.postgres,
                    'database': name}
            code = fork_run(argv_for(out, self.cache, ['--db', url]), self.log(out, 'gone'), spec)
            text = tail(self.log(out, 'gone'), 100000)
            res['problems'] += stderr_problems(text, code, 1, ('stopped answering', '--resume'))
            res['message'] = error_message(text)
            _pg_block(self.postgres, name, allow=True)
            (run_id,) = [r[0] for r in query(url, 'SELECT run_id FROM run')] or [None]
            code = fork_run(argv_for(out, self.cache, ['--db', url, '--resume', str(run_id)]), self.log(out, 'resume'))
            if code != 0:
                res['problems'].append(f'resume exited {code}: {tail(self.log(out, "resume"), 800)}')
            else:
                base = self.base_record()
                rec = record_of(url, out, run_id)
                p, res['lost'], res['duplicated'] = compare(rec, base, run_id, self.base_id)
                res['problems'] += p
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
            admin.close()
        res['survived'] = not res['problems']
        return res

    def fault_corrupt_checkpoint(self, k: int = 5) -> dict:
        """Killed at step k, bytes of checkpoint.pt flipped: --resume refuses it (exit 2, names the file); deleting
        the checkpoint and its sha256 as told restarts the run from its first step, same id, same final result."""
        out = self.root / 'corrupt'
        res = {'id': 'corrupt_checkpoint', 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        code = fork_run(argv_for(out, self.cache), self.log(out, 'killed'),
                        {'hook': 'step', 'phase': 'begin', 'k': k, 'action': 'kill'})
        if code != -signal.SIGKILL:
            res['problems'].append(f'the run was not killed (exit {code})')
        (run_id,) = recorded_ids(db_path(out)) or [None]
        ck = run_dir(out, run_id) / 'checkpoint.pt'
        data = bytearray(ck.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
        ck.write_bytes(bytes(data))
        code = fork_run(argv_for(out, self.cache, ['--resume', str(run_id)]), self.log(out, 'refused'))
        text = tail(self.log(out, 'refused'), 100000)
        res['problems'] += stderr_problems(text, code, 2, (str(ck), 'sha256', 'delete'))
        res['message'] = error_message(text)
        ck.unlink()
        ck.with_name('checkpoint.pt.sha256').unlink(missing_ok=True)
        return self.resume_and_check(out, res, str(run_id), 'restart from the first step')

    def fault_kill_while_replacing_memories(self) -> dict:
        """Killed in the middle of a memory append; the resumed run, replacing that half-written group, is killed in
        the middle of deleting it; the next resume must still end with complete, equal memories."""
        out = self.root / 'zarr_replace'
        res = {'id': 'kill_while_replacing_memories', 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}
        run_id = None
        for j, spec in enumerate([{'hook': 'zarr_append', 'phase': 'torn', 'k': 2, 'action': 'kill'},
                                  {'hook': 'zarr_delete', 'phase': 'torn', 'k': 1, 'action': 'kill'}]):
            code = fork_run(argv_for(out, self.cache, ['--resume', run_id] if run_id else []), self.log(out, f'run{j}'),
                            spec)
            if code != -signal.SIGKILL:
                res['problems'].append(f'run {j} was not killed (exit {code}): {tail(self.log(out, f"run{j}"), 600)}')
            run_id = run_id or (recorded_ids(db_path(out)) or [None])[0]
        return self.resume_and_check(out, res, run_id)

    def faults(self) -> list:
        """(name, callable) of the resource-fault scenarios."""
        ck_saves = self.counts.get('torch_save', 0)
        out = [('disk_full_checkpoint', lambda: self.fault_disk_full(
                   'disk_full_checkpoint', 'torch_save', 'torn', min(3, ck_saves))),
               ('disk_full_memories', lambda: self.fault_disk_full('disk_full_memories', 'zarr_append', 'torn', 2)),
               ('unwritable_out_dir', self.fault_unwritable_out_dir),
               ('db_unreachable_at_start', self.fault_db_unreachable),
               ('db_gone_midrun', lambda: self.fault_db_gone(
                   'db_gone_midrun', {'hook': 'step', 'phase': 'begin', 'k': 4},
                   ('stopped answering', '--resume', 'nothing after it is lost'))),
               ('db_gone_at_the_end', lambda: self.fault_db_gone(  # before final.safetensors: after the last checkpoint
                   'db_gone_at_the_end', {'hook': 'ckpt_write', 'phase': 'begin', 'k': self.final_write()},
                   ('finished', 'not recorded', '--resume'))),
               ('corrupt_checkpoint', self.fault_corrupt_checkpoint),
               ('kill_while_replacing_memories', self.fault_kill_while_replacing_memories)]
        if self.postgres:
            out.append(('postgres_gone_midrun', self.fault_pg_gone))
        return out + self.hardening()

    # ------------------------------------------------------------------ hardening: security, identity, signals, disks
    def final_write(self) -> int:
        """The atomic_write call that writes final.safetensors: the last three are final weights, summary.md and
        summary.json (runtime.run.execute)."""
        return self.counts['ckpt_write'] - 2

    @staticmethod
    def result(fid: str) -> dict:
        return {'id': fid, 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}

    @staticmethod
    def mount(folder: Path, options: str) -> str | None:
        """Mount a tmpfs at `folder` -> None, or why it cannot be mounted here (then the scenario is skipped)."""
        folder.mkdir(parents=True, exist_ok=True)
        if not shutil.which('mount'):
            return 'no mount command on this machine'
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)], capture_output=True,
                           text=True)
        if r.returncode:
            return f"cannot mount a tmpfs here ({(r.stderr.strip() or 'mount failed').splitlines()[0]}; needs root)"
        return None

    @staticmethod
    def umount(folder: Path) -> None:
        subprocess.run(['umount', str(folder)], capture_output=True)

    def pause_at(self, out: Path, hook: str, k: int, log: Path, extra=(),
                 file: str | None = None) -> tuple[int, Path]:
        """A run forked and held at the k-th call of `hook`, counting only writes of `file` when given (_tick); alive,
        its lock held: -> (pid, ready file)."""
        ready = out.parent / f'{out.name}.ready'
        ready.unlink(missing_ok=True)
        spec = {'hook': hook, 'phase': 'begin', 'k': k, 'action': 'pause', 'ready': str(ready)}
        pid = spawn(argv_for(out, self.cache, extra), log, dict(spec, file=file) if file else spec)
        deadline = time.time() + RUN_TIMEOUT
        while not ready.is_file() and time.time() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.05)
        return pid, ready

    def checkpoint_verifies(self, d: Path) -> bool:
        import runtime.checkpoint as R
        ck, side = d / 'checkpoint.pt', d / 'checkpoint.pt.sha256'
        return ck.is_file() and side.is_file() and R.sha256_file(ck) in side.read_text().split()

    def fault_real_disk_full(self, fid: str, hook: str, k: int, what: str, file: str | None = None) -> dict:
        """A real full filesystem: out_dir on a 32 MiB tmpfs, filled to the last byte when `hook` is called the k-th
        time, so torch.save (RuntimeError 'unexpected pos'), safetensors or zarr fail as they do on a full disk.
        Exit 1, one message naming the file, the disk and its free space; the record says FAILED (it lives on another
        disk); the last checkpoint verifies; no temporaries. Space freed, --resume ends equal to the baseline."""
        res = self.result(fid)
        disk = self.root / f'{fid}-disk'
        why = self.mount(disk, 'size=32m')
        if why:
            return dict(res, skipped=why, survived=True)
        try:
            out, db = disk / 'runs', self.root / f'{fid}.db'
            extra = ['--db', f'sqlite:///{db}']
            log = self.root / f'{fid}-full.log'
            code = fork_run(argv_for(out, self.cache, extra), log,
                            {'hook': hook, 'phase': 'begin', 'k': k, 'action': 'fill', 'path': str(disk),
                             'file': file})
            text = tail(log, 100000)
            res['problems'] += stderr_problems(text, code, 1, ('No space left on device', what,
                                                               f'the filesystem at {disk} (0 B free',
                                                               'recorded as FAILED', 'intact', '--resume'))
            res['message'] = error_message(text)
            (run_id,) = recorded_ids(db) or [None]
            if query(db, 'SELECT status FROM run') != [('FAILED',)]:
                res['problems'].append(f"status {query(db, 'SELECT status FROM run')} (want FAILED)")
            d = run_dir(out, run_id, db)
            if not self.checkpoint_verifies(d):
                res['problems'].append('the last checkpoint does not verify after the failed write')
            temps = sorted(p.name for p in list(d.glob('.*')) + list(d.glob('stages/.*')))
            if temps:
                res['problems'].append(f'temporary files left after the failed write: {temps}')
            (disk / 'filler').unlink()
            return self.resume_and_check(out, res, run_id, extra=extra, db=db, log=self.root / f'{fid}-resume.log')
        finally:
            self.umount(disk)

    def fault_sigterm(self, fid: str, hook: str, k: int, file: str | None = None) -> dict:
        """A real SIGTERM (what batch schedulers send), sent by the suite to a live run held at the k-th call of `hook`:
        exit 143, one message, status INTERRUPTED, a resume point that verifies; --resume ends equal to the baseline."""
        res, out = self.result(fid), self.root / fid
        log = self.log(out, 'term')
        pid, ready = self.pause_at(out, hook, k, log, file=file)
        if not ready.is_file():
            os.kill(pid, signal.SIGKILL)
            wait(pid)
            return dict(res, problems=[f'the run never reached {hook} #{k}: {tail(log, 600)}'], survived=False)
        os.kill(pid, signal.SIGTERM)
        code = wait(pid)
        text = tail(log, 100000)
        res['problems'] += stderr_problems(text, code, 143, ('INTERRUPTED', '--resume'), errors=0)
        if text.count('interrupted (SIGTERM)') != 1:
            res['problems'].append(f"{text.count('interrupted (SIGTERM)')} 'interrupted (SIGTERM)' messages (want 1)")
        res['message'] = text[text.rfind('interrupted'):].strip()
        (run_id,) = recorded_ids(db_path(out)) or [None]
        if query(db_path(out), 'SELECT status FROM run') != [('INTERRUPTED',)]:
            res['problems'].append(f"status {query(db_path(out), 'SELECT status FROM run')} (want INTERRUPTED)")
        if not self.checkpoint_verifies(run_dir(out, run_id)):
            res['problems'].append('no resume point that verifies')
        return self.resume_and_check(out, res, run_id)

    def fault_resume_while_alive(self) -> dict:
        """--resume of a run whose process is alive is refused (exit 2) naming its pid and host, and touches nothing;
        killed, the dead run shows as stale in `store.runs list` and a plain --resume takes it over."""
        import socket
        res, out = self.result('resume_while_alive'), self.root / 'alive'
        pid, ready = self.pause_at(out, 'step', 4, self.log(out, 'alive'))
        try:
            (run_id,) = recorded_ids(db_path(out)) or [None]
            before = query(db_path(out), 'SELECT name, step, value FROM memspec_metrics ORDER BY id')
            code = fork_run(argv_for(out, self.cache, ['--resume', str(run_id)]), self.log(out, 'second'))
            text = tail(self.log(out, 'second'), 100000)
            res['problems'] += stderr_problems(text, code, 2, (f'pid {pid} on {socket.gethostname()}', 'live process',
                                                               f'kill {pid}', f'--resume {run_id} again'))
            res['message'] = error_message(text)
            if query(db_path(out), 'SELECT status FROM run') != [('RUNNING',)] or \
                    query(db_path(out), 'SELECT name, step, value FROM memspec_metrics ORDER BY id') != before:
                res['problems'].append('the refused resume changed the record')
        finally:
            os.kill(pid, signal.SIGKILL)
            wait(pid)
        con = sqlite3.connect(db_path(out), timeout=600)
        with con:
            con.execute("UPDATE run SET heartbeat = datetime('now', '-2 hours')")
        con.close()
        code = fork_run(['list', '--db', f'sqlite:///{db_path(out)}'], self.log(out, 'list'), module='store.runs')
        listed = tail(self.log(out, 'list'), 100000)
        if code != 0 or 'RUNNING (stale: no heartbeat for 2 h' not in listed:
            res['problems'].append(f'store.runs list does not flag the dead run as stale (exit {code}): '
                                   f'{listed[-600:]}')
        res['listed'] = [ln for ln in listed.splitlines() if 'stale' in ln]
        return self.resume_and_check(out, res, run_id)

    def fault_crafted_checkpoint(self) -> dict:
        """checkpoint.pt replaced by a pickle whose __reduce__ creates a file (as a raw pickle and inside torch's zip
        format), with a matching checkpoint.pt.sha256: --resume refuses it (exit 2) and the payload never runs.
        --resume with a path instead of an id is refused too. The original checkpoint put back, --resume ends equal
        to the baseline (nothing else was touched)."""
        import hashlib
        import pickle
        res, out = self.result('crafted_checkpoint'), self.root / 'crafted'
        code = fork_run(argv_for(out, self.cache), self.log(out, 'killed'),
                        {'hook': 'step', 'phase': 'begin', 'k': 5, 'action': 'kill'})
        (run_id,) = recorded_ids(db_path(out)) or [None]
        d = run_dir(out, run_id)
        ck, side = d / 'checkpoint.pt', d / 'checkpoint.pt.sha256'
        original = ck.read_bytes(), side.read_bytes()
        ran = self.root / 'crafted-payload-ran'
        control = self.root / 'crafted-payload-control'
        pickle.loads(pickle.dumps(Payload(control)))  # the payload does run when unpickled plainly
        if not control.is_file():
            res['problems'].append('the crafted payload does not work: the test would prove nothing')
        buf = io.BytesIO()
        torch.save({'model': Payload(ran)}, buf)
        for fmt, blob in (('raw pickle', pickle.dumps({'model': Payload(ran)})), ('torch zip', buf.getvalue())):
            ck.write_bytes(blob)
            side.write_text(f'{hashlib.sha256(blob).hexdigest()}  checkpoint.pt\n')
            code = fork_run(argv_for(out, self.cache, ['--resume', str(run_id)]), self.log(out, 'crafted'))
            text = tail(self.log(out, 'crafted'), 100000)
            res['problems'] += [f'{fmt}: {p}' for p in stderr_problems(
                text, code, 2, ('holds objects other than tensors', 'not loaded', str(ck)))]
            res['message'] = error_message(text)
            if ran.exists():
                res['problems'].append(f'{fmt}: the payload ran (it created {ran})')
        ck.write_bytes(original[0])
        side.write_bytes(original[1])
        for ref in ('/tmp', '../..', f'{run_id}/../..', f'{d}'):
            code = fork_run(argv_for(out, self.cache, ['--resume', ref]), self.log(out, 'path'))
            text = tail(self.log(out, 'path'), 100000)
            res['problems'] += [f'--resume {ref}: {p}' for p in stderr_problems(text, code, 2, ('is not a run id',))]
        return self.resume_and_check(out, res, run_id)

    def fault_shared_out_dir(self) -> dict:
        """Two run databases sharing one out_dir (run 0 of each), and a third out_dir sharing its memory store: three
        runs numbered 0, three folders and memory groups, none touching another. Run A (the baseline's arguments)
        ends equal to the baseline. `store.analyze info 0` and `runtime.generate 0` refuse the ambiguous id, listing
        the runs; by full name (or analyze --db) each gives its own run's numbers."""
        res = self.result('shared_out_dir')
        out, other = self.root / 'shared', self.root / 'shared-other'
        db_a, db_b, db_c = db_path(out), self.root / 'shared-b.db', db_path(other)
        store = out / 'memories.zarr'
        runs = {'A': (argv_for(out, self.cache), db_a),
                'B': (argv_for(out, self.cache, ['--db', f'sqlite:///{db_b}'], ['Run.seed=1']), db_b),
                'C': (argv_for(other, self.cache, [], [f"Run.memory_store='{store}'", 'Run.seed=2']), db_c)}
        for key, (argv, db) in runs.items():
            code = fork_run(argv, self.log(self.root, f'shared-{key}'))
            if code != 0 or recorded_ids(db) != ['0']:
                res['problems'].append(f'run {key} exited {code}, ids {recorded_ids(db)}: '
                                       f'{tail(self.log(self.root, f"shared-{key}"), 600)}')
        if res['problems']:
            return dict(res, survived=False)
        names = {k: run_dir(out if k != 'C' else other, '0', db).name for k, (_, db) in runs.items()}
        if len(set(names.values())) != 3 or not all(n.startswith('0-') for n in names.values()):
            res['problems'].append(f'run folders/groups are not distinct: {names}')
        groups = sorted((g['run'], g['stage'], g['complete']) for g in M_listing(store))
        want = sorted((n, s, True) for n in names.values() for s in STAGES)
        if groups != want:
            res['problems'].append(f'memory store holds {groups}, want {want}')
        rec = record_of(db_a, out, '0')
        rec['zarr'] = {k: v for k, v in rec['zarr'].items() if k[0] == names['A']}  # the others are B's and C's
        p, res['lost'], res['duplicated'] = compare(rec, self.base_record(), '0', self.base_id)
        res['problems'] += [f'run A: {x}' for x in p]

        def cli(module, argv, tag):
            log = (self.root / f'shared-{tag}.out', self.root / f'shared-{tag}.err')
            code = fork_run([str(a) for a in argv], log, module=module)
            return code, tail(log[0], 100000), tail(log[1], 100000)

        def info(tag, *argv):
            code, text, err = cli('store.analyze', ['info', *argv, '--csv', '-'], tag)
            rows = [ln.split(',') for ln in text.strip().splitlines()]
            if code != 0 or len(rows) != 1 + len(STAGES):
                res['problems'].append(f'analyze info {argv}: exit {code}: {err[-600:]}')
                return []
            return rows

        code, _, err = cli('store.analyze', ['info', '0', '--store', store], 'info-ambiguous')
        res['problems'] += [f'analyze info 0: {x}'
                            for x in stderr_problems(err, code, 2, ('ambiguous', *names.values()))]
        res['message'] = error_message(err)
        base_rows = info('info-base', self.base_name, '--store', self.base_dir / 'memories.zarr')
        a_rows = info('info-a', names['A'], '--store', store)
        b_rows = info('info-b', '0', '--store', store, '--db', f'sqlite:///{db_b}')
        if [r[1:] for r in a_rows] != [r[1:] for r in base_rows] or not a_rows:
            res['problems'].append(f'analyze info of run A {a_rows} differs from the baseline {base_rows}')
        if not b_rows or {r[0] for r in b_rows[1:]} != {names['B']}:
            res['problems'].append(f"analyze info 0 --db <B's database> did not analyse run B: {b_rows}")
        code, _, err = cli('runtime.generate', ['0', '--runs', out, '--prompt', 'The'], 'gen-ambiguous')
        res['problems'] += [f'generate 0: {x}' for x in stderr_problems(err, code, 2, ('ambiguous', names['A'],
                                                                                       names['B']))]
        gen = ['--prompt', 'The while statement', '--max-new-tokens', '8', '--json']
        texts = {}
        for tag, argv in (('A', [names['A'], '--runs', out]), ('base', [self.base_name, '--runs', self.base_dir]),
                          ('B', [names['B'], '--runs', out])):
            code, text, err = cli('runtime.generate', argv + gen, f'gen-{tag}')
            texts[tag] = json.loads(text)['tokens'] if code == 0 and text.strip() else None
            if code != 0:
                res['problems'].append(f'generate {argv[0]}: exit {code}: {err[-600:]}')
        if texts['A'] is None or texts['A'] != texts['base']:
            res['problems'].append(f"generate from run A {texts['A']} differs from the baseline's {texts['base']}")
        res['names'] = names
        res['survived'] = not res['problems']
        return res

    def fault_damaged_memories(self) -> dict:
        """The baseline's memory store, damaged one way per copy: a missing chunk, a corrupt chunk (bytes flipped), a
        garbled group zarr.json and array zarr.json. `store.analyze info` and `runtime.generate --memories` exit 2
        naming the run, the stage and the rows; nothing reads as numbers."""
        res = self.result('damaged_memories')
        self.base_record()
        name, src = self.base_name, self.base_dir
        cases = {'missing chunk': ('autoencode/memories/c/1/0/0', 'delete', ('autoencode', 'rows 256-506', 'missing')),
                 'corrupt chunk': ('autoencode/tokens/c/0/0/0', 'flip', ('autoencode', 'rows 0-255', 'corrupt',
                                                                         'checksum')),
                 'garbled group metadata': ('blank_copy/zarr.json', 'garble', ('blank_copy', 'damaged')),
                 'garbled array metadata': ('autoencode/mask/zarr.json', 'garble', ('autoencode', 'damaged'))}
        for i, (case, (rel, how, needles)) in enumerate(cases.items()):
            copy = self.root / f'damaged-{i}'
            shutil.copytree(src, copy, ignore=shutil.ignore_patterns('sacred.db*'))
            target = copy / 'memories.zarr' / name / rel
            if how == 'delete':
                target.unlink()
            elif how == 'flip':
                data = bytearray(target.read_bytes())
                for j in range(len(data) // 3, len(data) // 3 + 8):
                    data[j] ^= 0xFF
                target.write_bytes(bytes(data))
            else:
                target.write_text('{"zarr_format": 3, "node_type": ' + 'x' * 40)
            log = (self.root / f'damaged-{i}.out', self.root / f'damaged-{i}.err')
            code = fork_run(['info', name, '--store', str(copy / 'memories.zarr')], log, module='store.analyze')
            err = tail(log[1], 100000)
            res['problems'] += [f'{case}: analyze: {p}' for p in stderr_problems(err, code, 2, (name, *needles))]
            if tail(log[0], 100000).strip():
                res['problems'].append(f'{case}: analyze printed results: {tail(log[0], 300)}')
            res.setdefault('messages', {})[case] = error_message(err)
            if how == 'delete':  # generation conditioned on a stored row of the missing chunk
                code = fork_run([name, '--runs', str(copy), '--prompt', 'The', '--memories', 'autoencode:300'], log,
                                module='runtime.generate')
                err = tail(log[1], 100000)
                res['problems'] += [f'{case}: generate: {p}' for p in stderr_problems(
                    err, code, 2, ('autoencode', 'rows 256-506', 'missing'))]
        res['survived'] = not res['problems']
        return res

    def fault_damaged_cache(self) -> dict:
        """The data cache damaged (train.tokens truncated, garbage in meta.json, garbage in tokenizer.json): the next
        run says so in one note, rebuilds it, and ends equal to the baseline. A cache folder that cannot be written
        (a file in its place) is refused before anything is recorded (exit 2)."""
        res = self.result('damaged_cache')
        cases = {'truncated train.tokens': ('train.tokens', 'truncate'), 'garbage meta.json': ('meta.json', 'garbage'),
                 'garbage tokenizer.json': ('tokenizer.json', 'garbage')}
        for i, (case, (file, how)) in enumerate(cases.items()):
            cache, out = self.root / f'cache-{i}', self.root / f'cache-run-{i}'
            shutil.copytree(self.cache, cache)
            (entry,) = cache.glob('data-*')
            target = entry / file
            if how == 'truncate':
                os.truncate(target, target.stat().st_size // 2)
            else:
                target.write_bytes(b'\x00garbage{' * 16)
            log = self.log(out, 'run')
            code = fork_run(argv_for(out, cache), log)
            text = tail(log, 100000)
            res['problems'] += [f'{case}: {p}' for p in stderr_problems(text, code, 0, (file, 'rebuilding it'))]
            if text.count('is damaged') != 1:
                res['problems'].append(f"{case}: {text.count('is damaged')} damage notes (want 1)")
            res.setdefault('notes', {})[case] = next((ln for ln in text.splitlines() if 'is damaged' in ln), '')
            if code == 0:
                p, lost, dup = self.check(out, (recorded_ids(db_path(out)) or [None])[0])
                res['problems'] += [f'{case}: {x}' for x in p]
                for k, v in lost.items():
                    res['lost'][k] = res['lost'].get(k, 0) + v
        blocker, out = self.root / 'cache-file', self.root / 'cache-run-blocked'
        blocker.write_text('not a folder\n')
        log = self.log(out, 'blocked')
        code = fork_run(argv_for(out, blocker), log)
        res['problems'] += [f'unwritable cache: {p}' for p in stderr_problems(tail(log, 100000), code, 2,
                                                                             ('Data.cache_dir', 'cannot write'))]
        if recorded_ids(db_path(out)) or [p for p in out.iterdir() if p.is_dir()]:
            res['problems'].append('unwritable cache: something was recorded or written')
        res['survived'] = not res['problems']
        return res

    def fault_refused_before_work(self) -> dict:
        """Refused before anything is recorded or written (exit 2, one message): an in-memory SQLite database; a memory
        store on a read-only filesystem (tmpfs mounted ro) or with damaged root metadata; a truncated .safetensors
        as an init_from source or given to runtime.generate."""
        res = self.result('refused_before_work')
        self.base_record()

        def refused(tag, argv, needles, module='runtime.run', out=None):
            log = self.root / f'refused-{tag}.log'
            code = fork_run([str(a) for a in argv], log, module=module)
            text = tail(log, 100000)
            res['problems'] += [f'{tag}: {p}' for p in stderr_problems(text, code, 2, needles)]
            res.setdefault('messages', {})[tag] = error_message(text)
            if out is not None and (db_path(out).exists() or any(p.is_dir() for p in out.glob('*'))):
                res['problems'].append(f'{tag}: something was recorded or written under {out}')

        for tag, url in (('memory db', 'sqlite://'), ('memory db file', 'sqlite:///:memory:')):
            out = self.root / f'refused-{tag.replace(" ", "-")}'
            refused(tag, argv_for(out, self.cache, ['--db', url]), ('in-memory', 'could not be resumed'), out=out)
        garbled = self.root / 'refused-garbled-store'
        garbled.mkdir()
        (garbled / 'zarr.json').write_text('{"zarr_format": 3,')
        out = self.root / 'refused-garbled'
        refused('garbled store', argv_for(out, self.cache, [], [f"Run.memory_store='{garbled}'"]),
                ('Run.memory_store', 'damaged'), out=out)
        ro = self.root / 'refused-ro'
        why = self.mount(ro, 'size=1m,ro')
        if why:
            res['skipped_parts'] = [f'read-only memory store: {why}']
        else:
            try:
                out = self.root / 'refused-ro-run'
                refused('read-only store', argv_for(out, self.cache, [], [f"Run.memory_store='{ro / 'm.zarr'}'"]),
                        ('Run.memory_store', 'cannot write', 'Read-only file system'), out=out)
            finally:
                self.umount(ro)
        trunc = self.root / 'refused-trunc'
        shutil.copytree(self.base_dir, trunc, ignore=shutil.ignore_patterns('sacred.db*', 'memories.zarr'))
        folder = trunc / self.base_name
        for f in (folder / 'final.safetensors', folder / 'stages' / 'autoencode.safetensors'):
            os.truncate(f, f.stat().st_size // 2)
        refused('truncated weights to generate', [self.base_name, '--runs', trunc, '--prompt', 'The'],
                ('cannot read the weights', 'final.safetensors'), module='runtime.generate')
        out = self.root / 'refused-init'
        probe = ['specs/information_probe.gin', '-b', f"Run.out_dir='{trunc}'", '-b', f"Data.cache_dir='{self.cache}'",
                 '-b', f"probe/Stage.init_from = {{'encoder': 'run:{self.base_id}/autoencode'}}",
                 *[x for b in BINDINGS[:6] + ['probe/Stage.steps=2'] for x in ('-b', b)]]
        before = sorted(p.name for p in trunc.iterdir())
        refused('truncated init_from source', probe, ("init_from 'run:", 'cannot read', 'autoencode.safetensors'))
        if sorted(p.name for p in trunc.iterdir()) != before:
            res['problems'].append('truncated init_from source: the refused run wrote into its out_dir')
        res['survived'] = not res['problems']
        return res

    def fault_password_never_shown(self) -> dict:
        """PostgreSQL with a password (a role made for the test): a run, a failing run, a refused run with a wrong
        password, a --resume, store.runs and store.analyze with both. The password appears in no output stream, in
        no file under the out_dir and in no row of the database; the URL is printed as user:***@."""
        import uuid

        import psycopg2
        from sqlalchemy.engine import make_url
        res = self.result('password_never_shown')
        role = f'memspec_pw_{os.getpid()}_{random.randrange(1 << 30)}'
        secret, wrong = f'pw-{uuid.uuid4().hex}', f'pw-{uuid.uuid4().hex}'
        admin = psycopg2.connect(self.postgres, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
            cur.execute(f'CREATE DATABASE {role} OWNER {role}')
        base = make_url(self.postgres).set(username=role, database=role)
        good = base.set(password=secret).render_as_string(hide_password=False)
        bad = base.set(password=wrong).render_as_string(hide_password=False)
        out = self.root / 'password'
        logs = []
        try:
            def call(tag, argv, want, module='runtime.run'):
                log = self.root / f'password-{tag}.log'
                logs.append(log)
                code = fork_run([str(a) for a in argv], log, module=module)
                if code != want:
                    res['problems'].append(f'{tag}: exit {code} (want {want}): {tail(log, 600)}')
                return tail(log, 100000)

            text = call('run', argv_for(out, self.cache, ['--db', good]), 0)
            if f'postgresql://{role}:***@' not in text:
                res['problems'].append('the run does not print its database as user:***@')
            call('failing run', argv_for(out, self.cache, ['--db', good], ['autoencode/Stage.lr=1e30',
                                                                           'autoencode/Stage.warmup=0']), 1)
            call('wrong password', argv_for(out, self.cache, ['--db', bad]), 2)
            call('resume, wrong password', argv_for(out, self.cache, ['--db', bad, '--resume', '0']), 2)
            call('resume of a finished run', argv_for(out, self.cache, ['--db', good, '--resume', '0']), 0)
            for tag, db, want in (('runs', good, 0), ('runs, wrong password', bad, 2)):
                call(tag, ['list', '--db', db], want, 'store.runs')
                call(f'{tag} show', ['show', '0', '--db', db], want, 'store.runs')
            for tag, db, want in (('analyze', good, 0), ('analyze, wrong password', bad, 2)):
                call(tag, ['info', '0', '--store', out / 'memories.zarr', '--db', db], want, 'store.analyze')
            leaks = [f'{log.name}' for log in logs for pw in (secret, wrong) if pw in log.read_text(errors='replace')]
            leaks += [str(p.relative_to(out)) for p in out.rglob('*') if p.is_file()
                      for pw in (secret, wrong) if pw.encode() in p.read_bytes()]
            con = psycopg2.connect(good, connect_timeout=10)
            try:
                with con.cursor() as cur:
                    cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
                    tables = [t for (t,) in cur.fetchall()]
                    rows = 0
                    for t in tables:
                        cur.execute(f'SELECT row_to_json(x)::text FROM "{t}" x')
                        for (row,) in cur.fetchall():
                            rows += 1
                            if secret in row or wrong in row:
                                leaks.append(f'database table {t}')
            finally:
                con.close()
            res['checked'] = {'logs': len(logs), 'files': sum(1 for p in out.rglob('*') if p.is_file()),
                              'tables': len(tables), 'rows': rows}
            if leaks:
                res['problems'].append(f'the password appears in: {sorted(set(leaks))}')
        finally:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS {role} WITH (FORCE)')
                cur.execute(f'DROP ROLE IF EXISTS {role}')
            admin.close()
        res['survived'] = not res['problems']
        return res

    def hardening(self) -> list:
        """(name, callable) of the scenarios of the hardening pass: disk, signals, locks, crafted files, shared
        folders, damaged stores and caches, refusals, secrets."""
        out = [('disk_full_real_checkpoint', lambda: self.fault_real_disk_full(
                   'disk_full_real_checkpoint', 'ckpt_write', 3, 'checkpoint.pt', 'checkpoint.pt')),  # 1st boundary
               ('disk_full_real_memories', lambda: self.fault_real_disk_full(
                   'disk_full_real_memories', 'zarr_append', 2, 'memories')),
               ('disk_full_real_final_weights', lambda: self.fault_real_disk_full(
                   'disk_full_real_final_weights', 'ckpt_write', self.final_write(), 'final.safetensors')),
               ('sigterm_mid_step', lambda: self.fault_sigterm('sigterm_mid_step', 'step', 4)),
               ('sigterm_in_evaluation', lambda: self.fault_sigterm('sigterm_in_evaluation', 'eval', 2)),
               ('sigterm_in_memory_write', lambda: self.fault_sigterm('sigterm_in_memory_write', 'zarr_append', 2)),
               # the 2nd write of checkpoint.pt (one exists): counted by file, so other writes (source.diff in a
               # dirty checkout, the tokenizer) do not move it
               ('sigterm_in_checkpoint_write', lambda: self.fault_sigterm('sigterm_in_checkpoint_write', 'ckpt_write',
                                                                          2, 'checkpoint.pt')),
               ('resume_while_alive', self.fault_resume_while_alive),
               ('crafted_checkpoint', self.fault_crafted_checkpoint),
               ('shared_out_dir', self.fault_shared_out_dir),
               ('damaged_memories', self.fault_damaged_memories),
               ('damaged_cache', self.fault_damaged_cache),
               ('refused_before_work', self.fault_refused_before_work)]
        if self.postgres:
            out.append(('password_never_shown', self.fault_password_never_shown))
        return out

    # ------------------------------------------------------------------ concurrent runs
    def concurrent(self, n: int, url: str | None, tag: str) -> dict:
        """n runs forked to start at the same instant on one database and one Zarr store (one out_dir)."""
        out = self.root / f'concurrent-{tag}'
        out.mkdir(parents=True, exist_ok=True)
        res = {'id': f'concurrent_{tag}', 'kind': 'concurrent', 'runs': n, 'problems': [], 'lost': {}, 'duplicated': {}}
        start = time.time() + 1.0
        extra = ['--db', url] if url else []
        pids = [spawn(argv_for(out, self.cache, extra, [f'Run.seed={i}']), out / f'run{i}.log', None, None, start)
                for i in range(n)]
        codes = [wait(p) for p in pids]
        for i, c in enumerate(codes):
            if c != 0:
                res['problems'].append(f'run {i} exited {c}: {tail(out / f"run{i}.log", 1200)}')
        db = url or db_path(out)
        rows = query(db, 'SELECT run_id, status FROM run ORDER BY id')
        ids = [r[0] for r in rows]
        res['ids'] = ids
        if len(ids) != n or len(set(ids)) != n:
            res['problems'].append(f'run table holds {rows}: want {n} rows with distinct ids')
        if any(s != 'COMPLETED' for _, s in rows):
            res['problems'].append(f'not all COMPLETED: {rows}')
        from store import memories as M
        groups = M.listing(out / 'memories.zarr')
        base = self.base_record()
        want_rows = {s: g['rows'] for (rid, s), g in base['zarr'].items()}
        folders = sorted(p.name.split('-')[0] for p in out.iterdir() if p.is_dir() and p.name != 'memories.zarr')
        if sorted(folders) != sorted(ids):
            res['problems'].append(f'run folders {folders} vs recorded ids {ids}')
        base_steps = collections.Counter((nm, s) for nm, s, _ in base['metrics'])
        for rid in ids:
            got = collections.Counter((nm, s) for nm, s, _ in query(
                db, 'SELECT name, step, value FROM memspec_metrics WHERE run_id = ?', rid))
            if got != base_steps:
                res['problems'].append(f'run {rid}: metrics {sum((base_steps - got).values())} lost, '
                                       f'{sum((got - base_steps).values())} duplicated')
                res['lost']['metric rows'] = res['lost'].get('metric rows', 0) + sum((base_steps - got).values())
                res['duplicated']['metric rows'] = (res['duplicated'].get('metric rows', 0)
                                                    + sum((got - base_steps).values()))
            mine = {g['stage']: g for g in groups if g['run_id'] == rid}
            for stage, rows_ in want_rows.items():
                g = mine.get(stage)
                if g is None or not g['complete'] or g['rows'] != rows_:
                    res['problems'].append(f'run {rid}: memory group {stage} {g}')
                    res['lost']['zarr rows'] = (res['lost'].get('zarr rows', 0) + rows_
                                                - (g['rows'] if g and g['complete'] else 0))
            if not (run_dir(out, rid) / 'final.safetensors').is_file():
                res['problems'].append(f'run {rid}: no final.safetensors')
            arts = sorted(r[0] for r in query(db, 'SELECT filename FROM artifact WHERE run_id = ?', rid))
            if arts != sorted(base['artifacts']):
                res['problems'].append(f'run {rid}: artifacts {arts}')
        stray = [g for g in groups if g['run_id'] not in ids]
        if stray:
            res['problems'].append(f'memory groups of unknown runs: {stray}')
        res['survived'] = not res['problems']
        return res


# ----------------------------------------------------------------------------------------- driver
def run_parallel(tasks: list, jobs: int, root: Path) -> list[dict]:
    """tasks: [(name, callable -> dict)]; each runs in its own forked worker (up to `jobs` at once)."""
    results, running, queue = {}, {}, list(tasks)
    while queue or running:
        while queue and len(running) < jobs:
            name, fn = queue.pop(0)
            path = root / f'result-{name}.json'
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    path.write_text(json.dumps(fn(), default=str))
                except BaseException:  # noqa: BLE001
                    path.write_text(json.dumps({'id': name, 'kind': 'error', 'survived': False, 'lost': {},
                                                'duplicated': {},
                                                'problems': [f'the scenario itself failed:\n'
                                                             f'{traceback.format_exc()}']}))
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (name, path, time.time())
        pid, status = os.wait()
        if pid in running:
            name, path, t0 = running.pop(pid)
            try:
                results[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                results[name] = {'id': name, 'kind': 'error', 'survived': False, 'lost': {}, 'duplicated': {},
                                 'problems': [f'worker died ({os.waitstatus_to_exitcode(status)}) without a result']}
            results[name].setdefault('seconds', round(time.time() - t0, 2))
            print(f"  {name:<28} {'ok' if results[name].get('survived') else 'FAILED'}  "
                  f"{results[name]['seconds']:>6.1f} s", flush=True)
    return [results[name] for name, _ in tasks]


def _faults(p: dict) -> int:
    """Faults injected by a scenario: kills that landed, one per resource fault, none for concurrent runs or skipped
    scenarios."""
    if p.get('skipped'):
        return 0
    return p.get('killed', 0) if p['kind'] == 'kill' else 0 if p['kind'] == 'concurrent' else 1


def _runs(p: dict) -> tuple[int, int]:
    """(runs that ended with correct, complete records, runs that should have): a kill point or fault is one run
    (however often it was killed), a concurrent scenario is its n runs. Kill points whose hook was not reached
    (no fault landed) are left out."""
    if (p['kind'] == 'kill' and not p.get('killed')) or p.get('skipped'):
        return 0, 0
    n = p.get('runs', 1) if p['kind'] == 'concurrent' else 1
    return (n if p.get('survived') else 0), n


def summarize(points: list[dict]) -> dict:
    ok, total = (sum(x) for x in zip(*[_runs(p) for p in points])) if points else (0, 0)
    return {'faults_injected': sum(_faults(p) for p in points), 'runs_survived': ok, 'runs': total,
            'scenarios': len(points), 'runs_failed': [p['id'] for p in points if not p.get('survived')],
            'records_lost': sum(sum(p.get('lost', {}).values()) for p in points),
            'records_duplicated': sum(sum(p.get('duplicated', {}).values()) for p in points),
            'not_reached': [p['id'] for p in points if p['kind'] == 'kill' and not p.get('killed')],
            'skipped': {p['id']: p['skipped'] for p in points if p.get('skipped')}}


def table(points: list[dict]) -> str:
    rows = collections.OrderedDict()
    for p in points:
        key = f"kill -9: {p['category']}" if p['kind'] == 'kill' else p['id']
        r = rows.setdefault(key, [0, 0, 0, 0, 0])
        ok, n = _runs(p)
        for i, v in enumerate((_faults(p), ok, n, sum(p.get('lost', {}).values()),
                               sum(p.get('duplicated', {}).values()))):
            r[i] += v
    lines = [f"{'scenario':<32}{'faults':>8}{'runs ok':>10}{'lost':>7}{'duplicated':>12}", '-' * 69]
    tot = [0, 0, 0, 0, 0]
    for k, (faults, ok, n, lost, dup) in rows.items():
        lines.append(f'{k:<32}{faults:>8}{f"{ok}/{n}":>10}{lost:>7}{dup:>12}')
        tot = [a + b for a, b in zip(tot, (faults, ok, n, lost, dup))]
    lines += ['-' * 69, f"{'total':<32}{tot[0]:>8}{f'{tot[1]}/{tot[2]}':>10}{tot[3]:>7}{tot[4]:>12}"]
    return '\n'.join(lines)


def postgres_url(arg: str | None) -> str | None:
    url = arg or os.environ.get('MEMSPEC_TEST_POSTGRES')
    if url == 'none':
        return None
    try:
        import psycopg2
        psycopg2.connect(url or PG_DEFAULT, connect_timeout=5).close()
        return url or PG_DEFAULT
    except Exception:  # noqa: BLE001
        if url:
            raise SystemExit(f'PostgreSQL at {url} is unreachable')
        return None


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


def _concurrent_pg(self: Suite, n: int) -> dict:
    import psycopg2
    from sqlalchemy.engine import make_url
    name = f'memspec_conc_{os.getpid()}_{random.randrange(1 << 30)}'
    admin = psycopg2.connect(self.postgres, connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE {name}')
    try:
        return self.concurrent(n, make_url(self.postgres).set(database=name).render_as_string(hide_password=False),
                               'postgres')
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
        admin.close()


Suite.concurrent_pg = _concurrent_pg

if __name__ == '__main__':
    sys.exit(main())
