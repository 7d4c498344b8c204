"""Hardening scenarios, part 1: a real full disk, SIGTERM, resuming a live run, a crafted checkpoint, shared
out_dirs and stores (hardening() lists every hardening scenario)."""
from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
from pathlib import Path

import torch

from fault_injection.common import (
    STAGES,
    M_listing,
    Payload,
    argv_for,
)
from fault_injection.hooks import (
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


class Hardening:
    """Hardening scenarios (see tests/faults.py); mixed into Suite."""

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

        self.shared_readers(res, out, store, names, db_b)
        res['names'] = names
        res['survived'] = not res['problems']
        return res

    def shared_readers(self, res: dict, out: Path, store: Path, names: dict, db_b: Path) -> None:
        """store.analyze and runtime.generate on the three runs numbered 0: the bare id is refused as ambiguous; by
        full name (analyze also by --db) each reads its own run."""
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
