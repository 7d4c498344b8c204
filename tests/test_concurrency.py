"""Concurrency: runs started at the same instant on one run database and one Zarr memory store.

- Four whole runs (tests/faults.py --concurrent 4: forks of one warmed-up process, released at the
  same instant) on one SQLite database and one Zarr store, then on PostgreSQL: distinct ids, one COMPLETED row each,
  every metric once, complete memory groups, one run folder each.
- Sacred's SqlObserver picks `max(id) + 1` as the new run's id, so runs starting together pick the same one (an
  IntegrityError on the unique run_id for all but one). Hammered directly here: 8 processes x 3 runs each, released
  together, through runtime.record.ResumableSqlObserver (no training: fast, and many more collisions).
- Zarr creates the store's root group exclusively: 6 writers opening a fresh store together (store.memories.Writer).

PostgreSQL: the server of MEMSPEC_TEST_POSTGRES (set by .ci/run), or a local one at the default URL; a fresh
database per test, dropped afterwards. Skipped (with the reason) only when the variable is unset and no server answers.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

PG_DEFAULT = 'postgresql://memspec:memspec@localhost:5432/postgres'
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1',
           PYTHONPATH=str(ROOT))


def pg_admin() -> str | None:
    env = os.environ.get('MEMSPEC_TEST_POSTGRES')
    try:
        import psycopg2
        psycopg2.connect(env or PG_DEFAULT, connect_timeout=5).close()
        return env or PG_DEFAULT
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if env:
            pytest.fail(f'MEMSPEC_TEST_POSTGRES={env} is set but the server is unreachable: {reason}')
        return None


def pg_skip_reason() -> str:
    return f'no PostgreSQL: MEMSPEC_TEST_POSTGRES is unset and {PG_DEFAULT} is unreachable; .ci/run starts a server'


# ------------------------------------------------------------------------------------------------- whole runs

@pytest.fixture(scope='module')
def four_at_once(tmp_path_factory, rt_cache):
    root = tmp_path_factory.mktemp('concurrent')
    admin = pg_admin()
    out = root / 'report.json'
    cmd = [sys.executable, str(ROOT / 'tests' / 'faults.py'), '--kills', '0', '--no-faults',
           '--concurrent', '4', '--jobs', '1', '--root', str(root / 'work'), '--cache', str(rt_cache),
           '--json', str(out), '--postgres', admin or 'none']
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.is_file(), f'no report (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return {p['id']: p for p in json.loads(out.read_text())['points']}, admin


def check_four(p):
    assert p['survived'], '\n'.join(p['problems'])
    assert len(p['ids']) == 4 == len(set(p['ids'])), p['ids']
    assert not sum(p['lost'].values()) and not sum(p['duplicated'].values()), (p['lost'], p['duplicated'])


def test_four_runs_at_once_on_one_sqlite_database_and_one_zarr_store(four_at_once):
    check_four(four_at_once[0]['concurrent_sqlite'])


def test_four_runs_at_once_on_postgresql(four_at_once):
    points, admin = four_at_once
    if admin is None:
        pytest.skip(pg_skip_reason())
    check_four(points['concurrent_postgres'])


# ------------------------------------------------------------------------------------------------- run ids

RACE = textwrap.dedent('''
    import datetime, json, os, sys, time, traceback
    from runtime.record import ResumableSqlObserver
    url, n, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start, pids = time.time() + 2.0, []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code, ids = 0, []
            try:
                obs = ResumableSqlObserver(url)   # the tables are created concurrently too
                time.sleep(max(0.0, start - time.time()))
                for j in range(runs):
                    ex = {'name': 'race', 'dependencies': [], 'sources': [], 'repositories': [], 'base_dir': '/'}
                    host = {'hostname': 'h', 'cpu': 'c', 'os': ['Linux', 'x'], 'python_version': '3.11'}
                    _id = obs.started_event(ex, 'main', host, datetime.datetime.utcnow(), {'i': i, 'j': j}, {}, None)
                    obs.log_metrics({'m': {'steps': [1], 'values': [float(i)],
                                           'timestamps': [datetime.datetime.utcnow()]}}, {})
                    obs.completed_event(datetime.datetime.utcnow(), 1.0)
                    ids.append(str(_id))
            except BaseException:
                traceback.print_exc()
                code = 1
            os.write(w, json.dumps(ids).encode())
            os._exit(code)
        os.close(w)
        pids.append((pid, r))
    out = []
    for pid, r in pids:
        data = b''
        while chunk := os.read(r, 65536):
            data += chunk
        _, status = os.waitpid(pid, 0)
        out.append({'exit': os.waitstatus_to_exitcode(status), 'ids': json.loads(data or b'[]')})
    print(json.dumps(out))
''')


def race(url, n=8, runs=3):
    r = subprocess.run([sys.executable, '-c', RACE, url, str(n), str(runs)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(x['exit'] == 0 for x in results), r.stderr[-5000:]
    return [i for x in results for i in x['ids']], r.stderr


def check_race(ids, rows, metrics, n=8, runs=3):
    assert len(ids) == n * runs and len(set(ids)) == n * runs, f'ids handed out: {sorted(ids)}'
    assert sorted(r[0] for r in rows) == sorted(ids), f'run table: {rows}'
    assert all(status == 'COMPLETED' for _, status in rows), rows
    assert sorted(m[0] for m in metrics) == sorted(ids), 'one metric row per run, under its own id'


def test_run_ids_stay_unique_when_many_runs_start_together_on_sqlite(tmp_path):
    import sqlite3
    db = tmp_path / 'race.db'
    ids, _ = race(f'sqlite:///{db}')
    con = sqlite3.connect(db)
    try:
        rows = con.execute('SELECT run_id, status FROM run').fetchall()
        metrics = con.execute('SELECT run_id FROM memspec_metrics').fetchall()
    finally:
        con.close()
    check_race(ids, rows, metrics)


def test_run_ids_stay_unique_when_many_runs_start_together_on_postgresql(pg_url):
    import psycopg2
    ids, _ = race(pg_url)
    con = psycopg2.connect(pg_url)
    try:
        with con.cursor() as cur:
            cur.execute('SELECT run_id, status FROM run')
            rows = cur.fetchall()
            cur.execute('SELECT run_id FROM memspec_metrics')
            metrics = cur.fetchall()
    finally:
        con.close()
    check_race(ids, rows, metrics)


# ------------------------------------------------------------------------------------------------- Zarr root

ZARR_RACE = textwrap.dedent('''
    import os, sys, time, traceback
    import torch
    from store import memories as M
    stores, n = sys.argv[1:-1], int(sys.argv[-1])
    failed = 0
    for path in stores:  # a fresh store each time: the race is in creating its root group
        start, pids = time.time() + 0.5, []
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    time.sleep(max(0.0, start - time.time()))
                    w = M.Writer(path, f'run{i}', 'stage', {'step': 1}, (3, 2, 4, 8))
                    w.append(torch.full((3, 2, 8), float(i)), torch.zeros(3, 2, 4, dtype=torch.long),
                             torch.ones(3, 2, 4, dtype=torch.bool))
                    w.close()
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
            pids.append(pid)
        failed += sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) != 0 for p in pids)
    sys.exit(1 if failed else 0)
''')


def test_many_writers_create_one_zarr_store_at_once(tmp_path):
    from store import memories as M
    stores = [tmp_path / f'memories{trial}.zarr' for trial in range(4)]
    r = subprocess.run([sys.executable, '-c', ZARR_RACE, *map(str, stores), '6'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for store in stores:
        groups = M.listing(store)
        assert sorted(g['run_id'] for g in groups) == [f'run{i}' for i in range(6)], groups
        assert all(g['complete'] and g['rows'] == 3 for g in groups), groups
        for i in range(6):
            mem, _, _ = M.open_group(store, f'run{i}', 'stage').rows(0, 3)
            assert bool((mem == i).all()), f'run{i} holds another writer\'s rows'


# ------------------------------------------------------------------------------------------------- SQLite locks

HOLD = textwrap.dedent('''
    import sqlite3, sys
    con = sqlite3.connect(sys.argv[1], timeout=60)
    con.execute("INSERT INTO memspec_metrics (run_id, name, step, value) VALUES ('held', 'm', 0, 0)")
    con.commit()
    print('holding', flush=True)
    sys.stdin.read()  # keeps its connection (and its shared lock) until the test closes stdin
    con.close()
''')


def test_reading_its_own_database_keeps_a_process_locks_so_no_commit_is_lost(tmp_path):
    """A process that writes a WAL database and also checks or reads it (a sweep driver holding its claims reads the
    recorded runs; runtime.run checks the file before recording) must keep its shared lock: closing any descriptor of
    the file drops every POSIX lock of the process. Without it, another process closing its last connection takes
    the database for unused and deletes the -wal file the first one still writes to; its later commits are lost once
    a third process holds the database. Forced here step by step, no timing involved."""
    import sqlite3

    from runtime import record
    from store import database
    url = f'sqlite:///{tmp_path / "sacred.db"}'
    engine = database.make_engine(url)
    database.METRICS.create(engine)
    insert = database.METRICS.insert()
    with engine.begin() as conn:  # the pool keeps this connection open: the process holds the file in WAL mode
        conn.execute(insert.values(run_id='first', name='m', step=0, value=0.0))
    record.check_lasting(url)  # what every writer does before recording
    assert database.open_db(url).runs() == []  # what a driver does while it holds its claims
    subprocess.run([sys.executable, '-c', 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('
                    '"SELECT COUNT(*) FROM memspec_metrics").fetchall()', str(tmp_path / 'sacred.db')],
                   check=True, timeout=600)  # another process opens and closes the database
    assert (tmp_path / 'sacred.db-wal').is_file(), 'the -wal file was deleted under an open connection'
    holder = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path / 'sacred.db')], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'holding\n'
        with engine.begin() as conn:
            conn.execute(insert.values(run_id='later', name='m', step=0, value=0.0))
        engine.dispose()
    finally:
        holder.communicate('', timeout=600)
    assert holder.returncode == 0
    con = sqlite3.connect(tmp_path / 'sacred.db')
    try:
        rows = sorted(r for (r,) in con.execute('SELECT run_id FROM memspec_metrics'))
    finally:
        con.close()
    assert rows == ['first', 'held', 'later']
