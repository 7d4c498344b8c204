"""Concurrent runs: N forks released at the same instant on one database (SQLite, or PostgreSQL) and one Zarr
store."""
from __future__ import annotations

import collections
import os
import random
import time
from pathlib import Path

from fault_injection.common import (
    argv_for,
)
from fault_injection.hooks import (
    spawn,
    wait,
)
from fault_injection.records import (
    db_path,
    query,
    run_dir,
    tail,
)


class Concurrent:
    """Concurrent-run scenarios; mixed into Suite."""

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
        folders = sorted(p.name.split('-')[0] for p in out.iterdir() if p.is_dir() and p.name != 'memories.zarr')
        if sorted(folders) != sorted(ids):
            res['problems'].append(f'run folders {folders} vs recorded ids {ids}')
        for rid in ids:
            self.check_concurrent_run(rid, db, out, groups, base, res)
        stray = [g for g in groups if g['run_id'] not in ids]
        if stray:
            res['problems'].append(f'memory groups of unknown runs: {stray}')
        res['survived'] = not res['problems']
        return res

    def check_concurrent_run(self, rid: str, db, out: Path, groups: list, base: dict, res: dict) -> None:
        """One of the concurrent runs against the baseline: its metrics, memory groups, final weights, artifacts."""
        base_steps = collections.Counter((nm, s) for nm, s, _ in base['metrics'])
        want_rows = {s: g['rows'] for (rid_, s), g in base['zarr'].items()}
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

    def concurrent_pg(self, n: int) -> dict:
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
