"""Resource faults: a full disk (simulated), an unwritable output folder, the run database unreachable or gone
mid-run, a corrupted checkpoint, a kill while memories are replaced."""
from __future__ import annotations

import errno
import os
import random
import signal
import tempfile
from pathlib import Path

import torch

from fault_injection.common import (
    argv_for,
)
from fault_injection.hooks import (
    _child,
    _pg_block,
    fork_run,
    wait,
)
from fault_injection.records import (
    compare,
    db_path,
    error_message,
    query,
    record_of,
    recorded_ids,
    run_dir,
    stderr_problems,
    tail,
)


class ResourceFaults:
    """Resource-fault scenarios (faults() lists them); mixed into Suite."""

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
                    if type(e).__name__ != 'UserError':
                        res['problems'].append(f'reading the half-written group raised {type(e).__name__}, '
                                               'not a clear error')
        return self.resume_and_check(out, res, run_id)

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

    def final_write(self) -> int:
        """The atomic_write call that writes final.safetensors: the last three are final weights, summary.md and
        summary.json (runtime.run.execute)."""
        return self.counts['ckpt_write'] - 2
