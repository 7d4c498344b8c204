"""Hardening scenarios, part 2: damaged memory stores and data caches, input refused before any work, a
PostgreSQL password that must never be shown."""
from __future__ import annotations

import os
import random
import shutil

from fault_injection.common import (
    BINDINGS,
    argv_for,
)
from fault_injection.hooks import (
    fork_run,
)
from fault_injection.records import (
    db_path,
    error_message,
    recorded_ids,
    stderr_problems,
    tail,
)


class Damage:
    """Damage and refusal scenarios; mixed into Suite."""

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
            call('resume of a finished run (refused)', argv_for(out, self.cache, ['--db', good, '--resume', '0']), 2)
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
