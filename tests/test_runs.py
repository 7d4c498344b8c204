"""`python -m store.runs` (store/runs.py) against a real observer database: three tiny runs recorded once per module
(two flagship curricula that differ in LR, one autoencoder), then list / show / metrics / compare, bad inputs, the
README's SQL, and the same queries on PostgreSQL (MEMSPEC_TEST_POSTGRES, or a local server; else skipped)."""
import csv
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store import runs as R
from store.database import get_run, open_db
from store.tables import BOLD, RESET

TINY = ['Data.vocab_size=300', 'Data.max_documents=30', 'D_MODEL=16', 'N_HEADS=2', 'N_LAYERS=1', 'BATCH=2',
        'Stage.eval_every=1000', 'Run.eval_batches=1', 'Run.log_every=1', "Run.memory_store='none'"]
FLAGSHIP_STEPS = ['autoencode/Stage.steps=2', 'blank/Stage.steps=2', 'copy/Stage.steps=1', 'combined/Stage.steps=1']
STAGES = ['autoencode', 'blank_copy', 'copy', 'combined']
LOCAL_PG = 'postgresql://memspec:memspec@localhost:5432/postgres'
# Runs several runtime.run invocations in one interpreter (one torch import for all of them).
BUILD = 'import json, sys\nfrom runtime.run import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)\n'


def env():
    return {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}


def argv(spec, out, *extra):
    b = [f"Run.out_dir='{out}'", f"Data.cache_dir='{out / 'cache'}'", *TINY, *extra]
    return [f'specs/{spec}'] + [x for kv in b for x in ('-b', kv)]


class Pg:
    """A throwaway PostgreSQL database (or the reason there is none)."""

    def __init__(self):
        self.explicit = 'MEMSPEC_TEST_POSTGRES' in os.environ
        admin = os.environ.get('MEMSPEC_TEST_POSTGRES') or LOCAL_PG
        self.url = self.record_url = self.reason = None
        try:
            import psycopg2
            import sqlalchemy as sa
            conn = psycopg2.connect(admin, connect_timeout=3)
        except Exception as e:  # noqa: BLE001  (no server: skip with the reason)
            how = ('MEMSPEC_TEST_POSTGRES' if self.explicit
                   else f'MEMSPEC_TEST_POSTGRES is unset and the local {LOCAL_PG}')
            self.reason = f'{how} is not reachable: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}'
            return
        conn.autocommit = True
        self.admin, self.name = conn, f'memspec_runs_{uuid.uuid4().hex[:10]}'
        conn.cursor().execute(f'CREATE DATABASE {self.name}')
        u = sa.engine.make_url(admin).set(database=self.name)
        self.url = u.set(drivername='postgresql').render_as_string(hide_password=False)
        # the recorder passes its URL to SQLAlchemy as is; 2.1 would pick psycopg 3 for plain postgresql://
        self.record_url = u.set(drivername='postgresql+psycopg2').render_as_string(hide_password=False)

    def rows(self, sql, *args):
        import psycopg2
        conn = psycopg2.connect(self.url)
        try:
            cur = conn.cursor()
            cur.execute(sql, args)
            return cur.fetchall()
        finally:
            conn.close()

    def drop(self):
        if self.url:
            self.admin.cursor().execute(f'DROP DATABASE IF EXISTS {self.name} WITH (FORCE)')
            self.admin.close()


class Runs:
    def __init__(self, tmp: Path, pg: Pg):
        self.tmp, self.pg = tmp, pg
        self.db_path = tmp / 'sacred.db'
        self.db = f'sqlite:///{self.db_path}'
        jobs = [argv('frozen_encoder_curriculum.gin', tmp, *FLAGSHIP_STEPS),
                argv('frozen_encoder_curriculum.gin', tmp, *FLAGSHIP_STEPS, 'LR=1e-3'),
                argv('autoencoder.gin', tmp, 'autoencode/Stage.steps=2')]
        if pg.url:
            jobs.append(argv('autoencoder.gin', tmp / 'pg', 'autoencode/Stage.steps=2') + ['--db', pg.record_url])
        p = subprocess.run([sys.executable, '-c', BUILD, json.dumps(jobs)], cwd=ROOT, env=env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, f'recording the test runs failed:\n{p.stderr[-3000:]}'
        self.ids = [r[0] for r in self.rows('SELECT run_id FROM run ORDER BY id')]
        assert self.ids == ['0', '1', '2'], self.ids  # counted from 0 without gaps (Sacred alone gave 0, 2, 3)
        self.a, self.b, self.c = self.ids
        for rid in self.ids:  # Sacred drops an observer that raised once: then the run has no metric rows
            assert self.rows('SELECT COUNT(*) FROM memspec_metrics WHERE run_id = ?', rid)[0][0] > 0, \
                f'the recorder logged no metrics for run {rid} (Sacred dropped its observer; see the run log):\n' \
                f'{p.stderr[-3000:]}'

    def rows(self, sql, *args, db=None):
        conn = sqlite3.connect(db or self.db_path)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def folder(self, rid) -> Path:
        """The run's folder, <id>-<key> (store/layout.py)."""
        (folder,) = self.tmp.glob(f'{rid}-*')
        return folder

    def metrics(self, rid):
        return self.rows('SELECT name, step, value FROM memspec_metrics WHERE run_id = ? ORDER BY name, step', rid)


@pytest.fixture(scope='module')
def pg():
    p = Pg()
    yield p
    p.drop()


@pytest.fixture(scope='module')
def runs(tmp_path_factory, pg):
    return Runs(tmp_path_factory.mktemp('runs'), pg)


def cli(capsys, *args, db=None):
    """store.runs in-process (fast); returns stdout. Errors surface as SystemExit(2)."""
    capsys.readouterr()
    R.main([*args, '--db', db] if db else list(args))
    return capsys.readouterr().out


def cli_error(capsys, *args, db=None) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        R.main([*args, '--db', db] if db else list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'fix: ' in err, err
    return err


def listed(out: str) -> list[str]:
    """Run ids of a `list` table (first column, after the header and rule)."""
    return [ln.split()[0] for ln in out.strip().splitlines()[2:]]


# ------------------------------------------------------------------------------------------------ list

def test_list_shows_every_run_with_spec_status_stages_and_final_metrics(runs, capsys):
    out = cli(capsys, 'list', db=runs.db)
    assert listed(out) == runs.ids
    header, lines = out.splitlines()[0], {ln.split()[0]: ln for ln in out.strip().splitlines()[2:]}
    for col in ('spec', 'status', 'stages', 'clm.ce', 'blank_copy acc', 'copy acc', 'autoencode acc', 'started'):
        assert col in header
    assert 'frozen_encoder_curriculum.gin' in lines[runs.a] and 'frozen_encoder_curriculum.gin' in lines[runs.b]
    assert 'autoencoder.gin' in lines[runs.c] and 'frozen' not in lines[runs.c]
    assert all('COMPLETED' in ln for ln in lines.values())
    assert ','.join(STAGES) in lines[runs.a] and ' autoencode ' in lines[runs.c]
    # the headline numbers are the last logged eval values
    final_ce = runs.rows("SELECT value FROM memspec_metrics WHERE run_id = ? AND name = 'eval/clm.ce' "
                         'ORDER BY step DESC LIMIT 1', runs.a)[0][0]
    assert f'{final_ce:.4f}' in lines[runs.a]
    ae = runs.rows("SELECT value FROM memspec_metrics WHERE run_id = ? AND name = 'eval/autoencode.token_accuracy' "
                   'ORDER BY step DESC LIMIT 1', runs.c)[0][0]
    assert f'{ae:.4f}' in lines[runs.c]


@pytest.mark.parametrize('args, expect', [
    (['--spec', 'frozen'], 'ab'),
    (['--spec', 'autoencoder.gin'], 'c'),
    (['--spec', 'base/memory'], 'ab'),  # includes count as the run's spec files too
    (['--status', 'COMPLETED'], 'abc'),
    (['--status', 'completed', '--spec', 'autoencoder'], 'c'),
    (['--where', 'Memory.chunks=4'], 'abc'),
    (['--where', 'plan.memory.chunks=4'], 'abc'),  # a raw flattened key
    (['--where', 'Memory.chunks=8'], ''),
    (['--where', 'Plan.family=autoencoder'], 'c'),
    (['--where', 'Plan.family!=autoencoder'], 'ab'),
    (['--where', 'LR=1e-3'], 'b'),  # a macro of the operative gin
    (['--where', 'blank/Stage.lr=0.002'], 'a'),  # gin scope 'blank' -> stage 'blank_copy'
    (['--where', 'autoencode/Stage.lr=2e-3'], 'ac'),
    (['--where', 'Stage.lr=0.001'], 'ab'),  # unscoped: any stage
    (['--where', 'encoder/Stack.d_model=16'], 'abc'),
    (['--where', 'Stack.d_model=16', '--where', 'Plan.family=memory'], 'ab'),
    (['--where', 'copy/Objective.kind=copy'], 'ab'),
    (['--where', "Memory.pad='learned'", '--spec', 'frozen', '--where', 'LR=0.002'], 'a'),
])
def test_list_filters(runs, capsys, args, expect):
    out = cli(capsys, 'list', *args, db=runs.db)
    assert listed(out) == [getattr(runs, k) for k in expect], out


def test_list_status_filter_sees_failed_runs(runs, capsys, tmp_path):
    db = tmp_path / 'copy.db'
    shutil.copy(runs.db_path, db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE run SET status = 'FAILED' WHERE run_id = ?", (runs.c,))
    conn.commit()
    conn.close()
    assert listed(cli(capsys, 'list', '--status', 'FAILED', db=f'sqlite:///{db}')) == [runs.c]
    assert listed(cli(capsys, 'list', '--status', 'COMPLETED', db=f'sqlite:///{db}')) == [runs.a, runs.b]
    capsys.readouterr()
    R.main(['list', '--status', 'INTERRUPTED', '--db', f'sqlite:///{db}'])
    out, err = capsys.readouterr()
    assert out == '' and 'no runs match' in err


@pytest.mark.parametrize('where, says', [
    ('Memory.chunk=4', "did you mean 'chunks'"),
    ('Nope.x=1', "unknown configurable 'Nope'"),
    ('plan.memory.nothing=1', "no recorded run has config key 'plan.memory.nothing'"),
    ('NO_SUCH_MACRO=3', "no recorded run has macro 'NO_SUCH_MACRO'"),
    ('middle/Stack.d_model=16', "unknown Stack scope 'middle'"),
    ('Memory.chunks', 'expected KEY=VALUE'),
])
def test_list_bad_where_names_the_filter(runs, capsys, where, says):
    err = cli_error(capsys, 'list', '--where', where, db=runs.db)
    assert f"--where '{where}'" in err and says in err


# ------------------------------------------------------------------------------------------------ show

def test_show(runs, capsys):
    out = cli(capsys, 'show', runs.a, db=runs.db)
    run_dir = runs.folder(runs.a)
    assert out.startswith(f'run {runs.a}  COMPLETED')
    assert f'run folder  {run_dir}' in out
    assert 'frozen_encoder_curriculum.gin' in out and 'includes base/memory.gin, base/tiny.gin' in out
    assert "-b 'LR=1e-3'" not in out and "-b 'D_MODEL=16'" in out
    assert 'family      memory' in out and 'd_model 16, 1 layers' in out and '4 chunks x 8 tokens' in out
    for stage in STAGES:
        assert re.search(rf'^    {stage} +\d', out, re.M), f'curriculum line for {stage}'
    # host, code, weights by reference, artifacts, operative gin
    host = runs.rows('SELECT hostname FROM host')[0][0]
    assert f'host        {host}' in out
    assert re.search(r'^code        git [0-9a-f]{12} on ', out, re.M) and 'seed 0' in out
    final = run_dir / 'final.safetensors'
    assert re.search(rf'^  final +{final.stat().st_size:,} +[0-9a-f]{{16}} +{re.escape(str(final))}$', out, re.M)
    assert re.search(r'^  stages/autoencode +[\d,]+ +[0-9a-f]{16} ', out, re.M)
    for name in ('operative.gin', 'summary.md', 'summary.json'):
        assert re.search(rf'^  {re.escape(name)} +[\d,]+$', out, re.M), name
    assert not re.search(r'^  final\.safetensors ', out, re.M)  # the bytes stay in the run folder
    assert 'D_MODEL = 16' in out and 'Memory.chunk_len = %CHUNK_LEN' in out
    # stage-end metrics: the run's own summary.json, stage by stage
    summary = json.loads((run_dir / 'summary.json').read_text())
    row = re.search(r'^  autoencode\.token_accuracy +(.*)$', out, re.M).group(1).split()
    assert row == [f"{summary[s]['autoencode.token_accuracy']:.4f}" for s in STAGES]
    steps = re.search(r'^  \(step\) +(.*)$', out, re.M).group(1).split()
    assert steps == ['2', '4', '5', '6']


def test_stage_end_metrics_equal_the_runs_summary(runs):
    db = open_db(runs.db)
    for rid in runs.ids:
        run = get_run(db, rid)
        summary = json.loads((runs.folder(rid) / 'summary.json').read_text())
        assert R.stage_end_metrics(db, run) == summary


def test_show_keys_lists_the_flattened_config(runs, capsys):
    out = cli(capsys, 'show', runs.b, '--keys', db=runs.db)
    assert 'plan.memory.chunks = 4' in out and 'plan.curriculum.blank_copy.lr = 0.001' in out
    assert 'plan.curriculum.combined.objectives.clm.kind = clm' in out


# ------------------------------------------------------------------------------------------------ metrics

def test_metrics_csv_is_the_database_rows(runs, capsys):
    out = cli(capsys, 'metrics', runs.a, '--csv', db=runs.db)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ['run', 'name', 'step', 'value']
    assert {r for r, _, _, _ in rows[1:]} == {runs.a}
    got = [(n, int(s), float(v)) for _, n, s, v in rows[1:]]
    assert got == runs.metrics(runs.a)  # exact values, same order
    names = {n for n, _, _ in got}
    assert {'train/loss', 'train/clm.loss', 'eval/blank_copy.token_accuracy', 'eval/blank_copy_ablated.token_accuracy',
            'eval/clm.ce', 'eval/autoencode.token_accuracy'} <= names


def test_metrics_name_filter_and_table(runs, capsys):
    out = cli(capsys, 'metrics', runs.a, '--name', 'eval/*accuracy', '--csv', db=runs.db)
    got = {(n, int(s), float(v)) for _, n, s, v in list(csv.reader(io.StringIO(out)))[1:]}
    want = {r for r in runs.metrics(runs.a) if r[0].startswith('eval/') and r[0].endswith('accuracy')}
    assert got == want and len(want) > 4
    out = cli(capsys, 'metrics', runs.a, '--name', 'train/loss', db=runs.db)
    body = out.strip().splitlines()[2:]
    db_rows = [r for r in runs.metrics(runs.a) if r[0] == 'train/loss']
    assert [(ln.split()[1], int(ln.split()[2])) for ln in body] == [(n, s) for n, s, _ in db_rows]
    assert [float(ln.split()[3]) for ln in body] == pytest.approx([v for _, _, v in db_rows], rel=1e-5)


def test_metrics_plot_writes_a_png(runs, capsys, tmp_path):
    png = tmp_path / 'curves.png'
    cli(capsys, 'metrics', runs.a, '--name', 'eval/', '--name', 'train/loss', '--plot', str(png), db=runs.db)
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b'\x89PNG\r\n\x1a\n'
    assert [p.name for p in tmp_path.iterdir()] == ['curves.png']  # no temporary file left behind


def test_metrics_of_several_runs_overlay_in_one_figure_and_in_json(runs, capsys, tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, 'close', lambda fig: figures.append(fig))  # keep the figure to look at it
    png = tmp_path / 'three.png'
    cli(capsys, 'metrics', runs.a, runs.b, runs.c, '--name', 'eval/', '--name', 'train/loss', '--name', 'train/lr',
        '--plot', str(png), db=runs.db)
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    (fig,) = figures
    titles = [ax.get_ylabel() for ax in fig.axes]
    assert titles[:4] == ['loss (nats)', 'cross-entropy (nats)', 'token accuracy', 'I_e = 1 - CE / ln V']
    assert 'learning rate' in titles  # one panel per kind: loss, CE and accuracy never share an axis
    def curves(panel):  # the runs' curves, not the vertical stage-end lines
        return [ln for ln in fig.axes[titles.index(panel)].get_lines() if len(set(ln.get_xdata())) > 1]
    assert len({ln.get_color() for ln in curves('loss (nats)')}) == 3  # one colour per run
    acc = curves('token accuracy')
    per_run = {}
    for ln in acc:  # each line is labelled '<run label> | <metric>'
        per_run.setdefault(ln.get_label().split(' | ')[0], []).append(
            (repr(ln._dash_pattern), ln.get_marker(), ln.get_color()))
    # clm, copy, blank copy, the needle in both forms (each also with memories ablated), autoencode
    assert max(len(v) for v in per_run.values()) == 11
    for styles in per_run.values():  # within a run, each metric has its own line style and shade
        assert len({s[:2] for s in styles}) == len(styles) and len({s[2] for s in styles}) > 1, styles
    data = json.loads(cli(capsys, 'metrics', runs.a, runs.c, '--name', 'train/loss', '--json', db=runs.db))
    assert [(d['run'], d['name'], d['step'], d['value']) for d in data] == \
        [(r, n, s, v) for r in (runs.a, runs.c) for n, s, v in runs.metrics(r) if n == 'train/loss']


def test_every_query_command_prints_json_and_csv(runs, capsys):
    listed_json = json.loads(cli(capsys, 'list', '--json', db=runs.db))
    assert [d['id'] for d in listed_json] == runs.ids and listed_json[0]['stages'] == STAGES
    final_ce = runs.rows("SELECT value FROM memspec_metrics WHERE run_id = ? AND name = 'eval/clm.ce' "
                         'ORDER BY step DESC LIMIT 1', runs.a)[0][0]
    assert listed_json[0]['eval/clm.ce'] == final_ce
    rows = list(csv.DictReader(io.StringIO(cli(capsys, 'list', '--csv', db=runs.db))))
    assert [r['id'] for r in rows] == runs.ids and float(rows[0]['eval/clm.ce']) == final_ce
    shown = json.loads(cli(capsys, 'show', runs.a, '--json', db=runs.db))
    summary = json.loads((runs.folder(runs.a) / 'summary.json').read_text())
    assert shown['stage_end_metrics'] == summary and shown['experiment'] == 'frozen_encoder_curriculum'
    assert shown['weights']['final']['path'] == str(runs.folder(runs.a) / 'final.safetensors')
    kv = dict(csv.reader(io.StringIO(cli(capsys, 'show', runs.a, '--csv', db=runs.db))))
    assert float(kv['stage_end_metrics.combined.clm.ce']) == summary['combined']['clm.ce']
    assert kv['plan.memory.chunks'] == '4'
    cmp = json.loads(cli(capsys, 'compare', runs.a, runs.b, '--json', db=runs.db))
    assert cmp['plan'] == {'plan.curriculum.autoencode.lr': [0.002, 0.001],
                           'plan.curriculum.blank_copy.lr': [0.002, 0.001]}
    assert cmp['bindings'] == {'LR': [None, '1e-3']}
    assert cmp['stage_end_metrics']['combined']['clm.ce'][0] == summary['combined']['clm.ce']
    table = list(csv.reader(io.StringIO(cli(capsys, 'compare', runs.a, runs.b, '--csv', db=runs.db))))
    assert table[0] == ['section', 'key', 'stage', runs.a, runs.b]
    assert ['plan', 'plan.curriculum.autoencode.lr', '', '0.002', '0.001'] in table


def test_metrics_unknown_name(runs, capsys):
    err = cli_error(capsys, 'metrics', runs.a, '--name', 'eval/no_such_metric', db=runs.db)
    assert '--name eval/no_such_metric' in err and 'eval/clm.ce' in err


# ------------------------------------------------------------------------------------------------ compare

def section(out: str, title: str) -> str:
    return out.split(f'\n{title}', 1)[1].split('\n\n', 1)[0]


def test_compare_shows_only_differing_plan_keys(runs, capsys):
    out = cli(capsys, 'compare', runs.a, runs.b, db=runs.db)
    plan = section(out, 'plan:')
    keys = {ln.split()[0]: ln.split()[1:] for ln in plan.strip().splitlines()[3:]}
    # LR=1e-3 moved the two stages that use %LR; the copy/combined stages have their own lr
    assert keys == {'plan.curriculum.autoencode.lr': ['0.002', '0.001*'],
                    'plan.curriculum.blank_copy.lr': ['0.002', '0.001*']}, plan
    assert 'plan.memory.chunks' not in out and 'plan.curriculum.copy.lr' not in out
    bindings = section(out, 'command-line bindings that differ')
    assert re.search(r'^  LR +- +1e-3\*$', bindings, re.M), bindings
    assert 'D_MODEL' not in bindings
    metrics = section(out, 'stage-end metrics')
    for stage in STAGES:
        assert re.search(rf'^  {stage} +blank_copy\.token_accuracy +[\d.]+ +[\d.]+$', metrics, re.M), stage


def test_compare_across_specs_collapses_missing_stages(runs, capsys):
    out = cli(capsys, 'compare', runs.a, runs.c, '--color', 'never', db=runs.db)
    plan = section(out, 'plan:')
    assert re.search(r'^  plan\.family +memory +autoencoder\*$', plan, re.M)
    assert re.search(r'^  plan\.curriculum\.blank_copy\.\* +present +-\*$', plan, re.M)
    assert 'plan.curriculum.blank_copy.lr' not in plan and 'plan.encoder.d_model' not in plan
    everything = cli(capsys, 'compare', runs.a, runs.b, '--all', db=runs.db)
    assert re.search(r'^  plan\.memory\.chunks +4 +4$', everything, re.M)


def test_compare_bold_on_a_terminal(runs, capsys):
    out = cli(capsys, 'compare', runs.a, runs.b, '--color', 'always', db=runs.db)
    assert f'{BOLD}0.001{RESET}' in out and '0.001*' not in out


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_inputs_exit_2_with_one_message(runs, tmp_path):
    """Through the real entry point: exit code 2, a message naming the place and the fix, no traceback."""
    missing = tmp_path / 'nowhere' / 'sacred.db'
    cases = {
        'unknown run': (['show', '999', '--db', runs.db], ['RUN 999: no run matches', 'known: ' + ', '.join(runs.ids)]),
        'missing file': (['list', '--db', f'sqlite:///{missing}'], [f'--db sqlite:///{missing}', 'no run database']),
        'server down': (['list', '--db', 'postgresql://memspec:s3cret@127.0.0.1:1/runs'], ['--db postgresql://memspec:***@',
                                                                                          'cannot open']),
        'unknown metric': (['metrics', runs.a, '--name', 'nope/nothing', '--db', runs.db], ['--name nope/nothing']),
    }
    procs = {k: subprocess.Popen([sys.executable, '-m', 'store.runs', *a], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, (a, _) in cases.items()}
    ok = subprocess.run([sys.executable, '-m', 'store.runs', 'list', '--db', runs.db], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0 and listed(ok.stdout) == runs.ids, ok.stderr
    errs = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=600)
        errs[k] = err
        assert p.returncode == 2, f'{k}: exit {p.returncode}\n{err}'
        assert 'Traceback' not in err and err.startswith('error: ') and '\n  fix: ' in err, f'{k}:\n{err}'
        assert len(err.strip().splitlines()) == 2, f'{k}: one message expected\n{err}'
        for s in cases[k][1]:
            assert s in err, f'{k}: {s!r} not in\n{err}'
    assert 's3cret' not in errs['server down']
    assert not missing.parent.exists(), 'a missing database must not be created'


def test_more_bad_inputs(runs, capsys, tmp_path, monkeypatch):
    assert 'RUN 998: no run matches' in cli_error(capsys, 'compare', runs.a, '998', db=runs.db)
    assert 'needs at least two run ids' in cli_error(capsys, 'compare', runs.a, db=runs.db)
    assert f'write sqlite:///{runs.db_path}' in cli_error(capsys, 'list', db=str(runs.db_path))
    assert "unsupported database 'mysql'" in cli_error(capsys, 'list', db='mysql://u@host/db')
    err = cli_error(capsys, 'metrics', runs.a, '--plot', str(tmp_path / 'no' / 'x.png'), db=runs.db)
    assert f"--plot {tmp_path / 'no' / 'x.png'}" in err and 'does not exist' in err
    err = cli_error(capsys, 'metrics', runs.a, '--plot', str(tmp_path / 'x.xyz'), db=runs.db)
    assert 'not supported' in err and not list(tmp_path.iterdir())
    not_a_db = tmp_path / 'notes.db'
    not_a_db.write_text('not sqlite')
    assert 'notes.db is not a SQLite database' in cli_error(capsys, 'list', db=f'sqlite:///{not_a_db}')
    empty = tmp_path / 'empty.db'
    sqlite3.connect(empty).close()
    assert "no Sacred 'run' table" in cli_error(capsys, 'list', db=f'sqlite:///{empty}')
    monkeypatch.chdir(tmp_path)  # the default --db is relative to the working folder
    err = cli_error(capsys, 'list')
    assert '--db sqlite:///runs/sacred.db' in err and not (tmp_path / 'runs').exists()


def test_no_password_in_messages(capsys):
    err = cli_error(capsys, 'list', '--db', 'postgresql://memspec:s3cret@127.0.0.1:1/runs')
    assert 's3cret' not in err and 'memspec:***@127.0.0.1' in err


def test_mongodb_without_pymongo(capsys):
    try:
        import pymongo  # noqa: F401
        pytest.skip('pymongo is installed: the missing-driver message does not apply')
    except ImportError:
        pass
    err = cli_error(capsys, 'list', '--db', 'mongodb://localhost/sacred')
    assert 'needs pymongo, which is not installed' in err and 'pip install pymongo' in err


# ------------------------------------------------------------------------------------------------ README SQL

def readme_queries() -> list[str]:
    text = (ROOT / 'README.md').read_text()
    assert '\n## Querying runs\n' in text, 'README lacks the "## Querying runs" section'
    sec = text.split('\n## Querying runs\n', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```sql\n(.*?)```', sec, re.S)


def test_readme_sql_queries_run_on_sqlite(runs):
    queries = readme_queries()
    assert len(queries) == 3
    results = [runs.rows(q.replace("run_id = '0'", f"run_id = '{runs.a}'")) for q in queries]
    assert all(results), [len(r) for r in results]
    best = results[0]  # last blank-copy accuracy of the two flagship runs
    assert {r[0] for r in best} == {runs.a, runs.b}
    for rid, *_, value in best:
        assert value == [v for n, _, v in runs.metrics(rid) if n == 'eval/blank_copy.token_accuracy'][-1]
    assert {r[1] for r in results[1]} == {'train/loss', 'eval/clm.ce'}
    assert [r[0] for r in results[2]] == runs.ids  # every run has 4 chunks


# ------------------------------------------------------------------------------------------------ PostgreSQL

def test_postgres_list_and_metrics(runs, pg, capsys):
    if pg.url is None:
        if pg.explicit:
            pytest.fail(pg.reason)
        pytest.skip(pg.reason)
    ids = [r[0] for r in pg.rows('SELECT run_id FROM run ORDER BY id')]
    assert len(ids) == 1
    out = cli(capsys, 'list', db=pg.url)
    assert listed(out) == ids and 'autoencoder.gin' in out and 'COMPLETED' in out
    assert listed(cli(capsys, 'list', '--where', 'Memory.chunks=4', '--status', 'COMPLETED', db=pg.url)) == ids
    assert listed(cli(capsys, 'list', '--where', 'Memory.chunks=2', db=pg.url)) == []
    out = cli(capsys, 'metrics', ids[0], '--csv', db=pg.url)
    got = [(n, int(s), float(v)) for _, n, s, v in list(csv.reader(io.StringIO(out)))[1:]]
    want = pg.rows('SELECT name, step, value FROM memspec_metrics WHERE run_id = %s ORDER BY name, step, id', ids[0])
    assert got == [(n, s, v) for n, s, v in want] and got
    out = cli(capsys, 'show', ids[0], db=pg.url)
    assert 'final.safetensors' in out and 'autoencode.token_accuracy' in out
    err = cli_error(capsys, 'show', '12345', db=pg.url)
    assert "RUN 12345: no run matches '12345'" in err  # store/runref.py's message (issue 22)
    # the README's first two queries are plain SQL for PostgreSQL as well
    q1, q2, _ = readme_queries()
    pg.rows(q1)
    assert {r[1] for r in pg.rows(q2.replace("run_id = '0'", f"run_id = '{ids[0]}'"))} == {'train/loss'}
