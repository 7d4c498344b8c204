"""Run recording (runtime/record.py): Sacred's run table plus the memspec_metrics table, queried with plain SQL
from SQLite and PostgreSQL, and refused database URLs."""
import json
import sqlite3

import pytest
from conftest import FLAGSHIP, TINY_FLAGSHIP, rt_argv, rt_bindings, rt_main, rt_run_dir, rt_run_ids

# tiny flagship: autoencode 3, blank_copy 3, copy 2, combined 2 steps; Run.log_every=1, Stage.eval_every=2
STEPS = list(range(1, 11))
STAGE_ENDS = {'autoencode': 3, 'blank_copy': 6, 'copy': 8, 'combined': 10}
EVAL_NAMES = ('eval/clm.ce', 'eval/blank_copy.token_accuracy', 'eval/blank_copy_ablated.token_accuracy',
              'eval/autoencode.token_accuracy', 'eval/copy.token_accuracy')

# plain SQL, the way a user would write it; {p} is the driver's placeholder
JOINED = """SELECT m.name, m.step, m.value, r.status
            FROM memspec_metrics AS m JOIN run AS r ON r.run_id = m.run_id
            WHERE r.run_id = {p} ORDER BY m.name, m.step"""
CONFIG = 'SELECT status, config FROM run WHERE run_id = {p}'


def spec_hash(argv):
    from compiler.spec import load
    return load([FLAGSHIP], rt_bindings(argv)).hash


def check_recorded(query, run_id, run_dir, argv):
    """query(sql, *args) -> rows. The run's metrics, joined with its Sacred row, and its recorded config."""
    rows = query(JOINED, str(run_id))
    assert rows, f'no metrics joined to run {run_id}'
    assert {r[3] for r in rows} == {'COMPLETED'}
    by_name = {}
    for name, step, value, _ in rows:
        by_name.setdefault(name, []).append((step, value))
    assert [s for s, _ in by_name['train/loss']] == STEPS
    assert all(isinstance(v, float) for _, v in by_name['train/loss'])
    for name in EVAL_NAMES:
        steps = [s for s, _ in by_name.get(name, [])]
        assert set(STAGE_ENDS.values()) <= set(steps), f'{name} steps {steps}'
        assert len(steps) == len(set(steps)), f'{name} recorded twice at a step: {steps}'
    assert {n.split('/')[0] for n in by_name} == {'train', 'eval'}
    # the recorded stage-end evaluation is the one in summary.json
    summary = json.loads((run_dir / 'summary.json').read_text())
    for stage, end in STAGE_ENDS.items():
        for key, value in summary[stage].items():
            recorded = dict(by_name[f'eval/{key}'])[end]
            assert recorded == pytest.approx(value, rel=1e-9, abs=1e-12), f'eval/{key} at step {end}'

    # every metric row belongs to a recorded run
    orphans = ('SELECT COUNT(*) FROM memspec_metrics AS m LEFT JOIN run AS r ON r.run_id = m.run_id '
               'WHERE r.run_id IS NULL')
    assert query(orphans) == [(0,)]

    ((status, config),) = query(CONFIG, str(run_id))
    assert status == 'COMPLETED'
    config = json.loads(config)
    assert config['spec_hash'] == spec_hash(argv)
    assert config['operative_gin'] == (run_dir / 'operative.gin').read_text()
    assert 'autoencode/Stage.steps = 3' in config['operative_gin']


def test_metrics_are_queryable_with_plain_sql_from_sqlite(flagship_run):
    def query(sql, *args):
        con = sqlite3.connect(flagship_run.db)
        try:
            return con.execute(sql.format(p='?'), args).fetchall()
        finally:
            con.close()

    check_recorded(query, flagship_run.run_id, flagship_run.run_dir, flagship_run.argv)


# -------------------------------------------------------------------------------------------------- PostgreSQL



def test_metrics_are_queryable_with_plain_sql_from_postgresql(pg_url, tmp_path, rt_cache):
    import psycopg2
    out = tmp_path / 'runs'
    argv = rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP, ['--db', pg_url])
    assert rt_main(argv) == 0
    (run_id,) = rt_run_ids(out)
    assert not (out / 'sacred.db').exists(), 'with --db the run must not fall back to the SQLite default'

    def query(sql, *args):
        con = psycopg2.connect(pg_url)
        try:
            with con.cursor() as cur:
                cur.execute(sql.format(p='%s'), args)
                return cur.fetchall()
        finally:
            con.close()

    check_recorded(query, run_id, rt_run_dir(out, run_id), argv)
    assert query('SELECT COUNT(*) FROM run') == [(1,)]


# -------------------------------------------------------------------------------------------------- refused URL

def test_unreachable_database_exits_2_and_leaves_no_run_folder(rt_refusals):
    out, r = rt_refusals.cases['unreachable_db']
    assert r.returncode == 2, r.stderr[-3000:]
    assert '--db postgresql://nobody@127.0.0.1:1/x' in r.stderr, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert rt_run_ids(out) == set()
    assert not (out / 'sacred.db').exists()
