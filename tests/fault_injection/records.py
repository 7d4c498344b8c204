"""What a run left behind: its record, files and store, read back and compared with the baseline's."""
from __future__ import annotations

import collections
import json
import os
import sqlite3
from pathlib import Path

import torch

from runtime.tracking import WALL_CLOCK


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
    _compare_files(rec, base, problems)
    _compare_record(rec, base, run_id, problems, lost, dup)
    _compare_store(rec, base, problems, lost, dup)
    if not rec['checkpoint_ok']:
        problems.append('checkpoint.pt does not verify against checkpoint.pt.sha256')
    if rec['temporaries']:
        problems.append(f"temporary files left: {rec['temporaries']}")
    if rec['modes']:
        problems.append(f"files other users cannot read (not the umask's mode): {rec['modes'][:4]}")
    return problems, dict(lost), dict(dup)


def _compare_files(rec: dict, base: dict, problems: list) -> None:
    """summary.json, the final and stage weights against the baseline's."""
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


def _compare_record(rec: dict, base: dict, run_id: str, problems: list, lost, dup) -> None:
    """The database: one run, COMPLETED, with the baseline's metrics, artifacts, stage end steps and result."""
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


def _compare_store(rec: dict, base: dict, problems: list, lost, dup) -> None:
    """The Zarr store: exactly the baseline's groups, complete, same rows."""
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


