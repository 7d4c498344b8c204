"""In the forked run: the hooks that count calls and inject a fault at the k-th one (kill -9, ENOSPC, the
database going away, a pause, a full disk), and forking a run with them installed."""
from __future__ import annotations

import collections
import errno
import io
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from fault_injection.common import (
    RUN_TIMEOUT,
)

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

    # Each hook replaces the function where it is defined; the runtime calls these through their modules, and the
    # baseline run checks that every hook is reached (Suite.baseline), so a refactor cannot silently bypass one.
    _hook_training()
    _hook_store()
    _hook_database(spec)


def _hook_training() -> None:
    """Training steps, evaluation, every atomic file write and torch.save."""
    import runtime.train as T
    import store.files as C

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

    T.stage_loss, T.evaluate, C.atomic_write, torch.save = stage_loss, evaluate, atomic_write, save


def _hook_store() -> None:
    """The memory store's writer (open, append, close) and zarr's group deletion."""
    import zarr

    from store import memories as M

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
            self.mem[sl] = M.stored(memories, self.dtype)
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

    M.Writer.__init__, M.Writer.append, M.Writer.close = init, append, close
    zarr.Group.__delitem__ = delitem


def _hook_database(spec: dict | None) -> None:
    """Every commit of the run database; with action db_down, every statement fails once the fault fired."""
    import sqlalchemy.engine.default as D

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


