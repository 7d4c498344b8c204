"""What a researcher reaches for: range-checked CLI numbers and 'did you mean' (compiler/args.py), the field
reference (compiler/fields.py, docs/fields.md), Run.checkpoint_every under Run.steps_scale, the resume line,
`store.runs group | tag | note | delete` (store/groups.py, store/manage.py) and the curves' styling (store/plots.py),
against four tiny recorded runs (two learning rates x two seeds)."""
import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import argparse_error

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compiler import fields  # noqa: E402
from compiler.plan import CONFIGURABLES  # noqa: E402
from compiler.spec import load  # noqa: E402
from store import plots  # noqa: E402
from store import runs as R  # noqa: E402

TINY = ['Data.vocab_size=300', 'Data.max_documents=30', 'D_MODEL=16', 'N_HEADS=2', 'N_LAYERS=1', 'BATCH=2',
        'Stage.eval_every=1000', 'Run.eval_batches=1', 'Run.log_every=1', 'autoencode/Stage.steps=3']
BUILD = 'import json, sys\nfrom runtime.run import main\nfor argv in json.loads(sys.argv[1]):\n    main(argv)\n'
GRID = [('1e-3', 0), ('1e-3', 1), ('2e-3', 0), ('2e-3', 1)]


def env():
    return {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'PYTHONPATH': str(ROOT)}


@pytest.fixture(scope='module')
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp('grid')
    jobs = []
    for lr, seed in GRID:
        b = [f"Run.out_dir='{out}'", f"Data.cache_dir='{out / 'cache'}'", *TINY, f'autoencode/Stage.lr={lr}',
             f'Run.seed={seed}']
        jobs.append(['specs/autoencoder.gin'] + [x for kv in b for x in ('-b', kv)])
    p = subprocess.run([sys.executable, '-c', BUILD, json.dumps(jobs)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return SimpleNamespace(out=out, db=f"sqlite:///{out / 'sacred.db'}", path=out / 'sacred.db')


def rows(path, sql, *args):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def cli(capsys, *args):
    capsys.readouterr()
    R.main(list(args))
    return capsys.readouterr()


# ------------------------------------------------------------------------------------------------ arguments

@pytest.mark.parametrize('flag, value, says', [
    ('--devices', '0', '0 is out of range: give an integer between 1 and 1048576'),
    ('--devices', '-3', '-3 is out of range: give an integer between 1 and 1048576'),
    ('--devices', '10**9', "'10**9' is not an integer"),
    ('--tflops', 'nan', 'nan is not a finite number'),
    ('--tflops', 'inf', 'inf is not a finite number'),
    ('--tflops', '0', '0 is out of range: give a number above 0'),
    ('--tflops', '1e300', '1e300 is out of range: give a number at most 1e+09'),
])
def test_compiler_numbers_are_range_checked(capsys, flag, value, says):
    from compiler.__main__ import main
    last = argparse_error(capsys, main, ['specs/clm.gin', flag, value])
    assert last == f'python -m compiler: error: argument {flag}: {says}'


STATUSES = "'COMPLETED', 'FAILED', 'INTERRUPTED', 'RUNNING', 'TIMEOUT', 'QUEUED'"
COMMANDS = "'list', 'show', 'metrics', 'compare', 'group', 'tag', 'note', 'delete'"


@pytest.mark.parametrize('argv, says', [
    (['grop', '1'], ": error: argument {list,show,metrics,compare,group,tag,note,delete}: invalid choice: 'grop' "
                    f"(choose from {COMMANDS}); did you mean 'group'?"),
    (['list', '--status', 'compltd'], " list: error: argument --status: invalid choice: 'COMPLTD' "
                                      f"(choose from {STATUSES}); did you mean 'COMPLETED'?"),
    (['compare', '0', '1', '--color', 'allways'], " compare: error: argument --color: invalid choice: 'allways' "
                                                  "(choose from 'auto', 'always', 'never'); did you mean 'always'?"),
    (['list', '--status', 'xyz'], f" list: error: argument --status: invalid choice: 'XYZ' (choose from {STATUSES})"),
])
def test_misspelled_choices_get_did_you_mean(capsys, argv, says):
    assert argparse_error(capsys, R.main, argv) == f'python -m store.runs{says}'


def test_sweep_cli_numbers_and_commands(capsys):
    from runtime.sweep import main
    assert argparse_error(capsys, main, ['rnu', 'x.gin']).endswith("invalid choice: 'rnu' (choose from 'run', "
                                                                      "'status'); did you mean 'run'?")
    for value, says in (('0', '0 is out of range: give an integer between 1 and 4096'),
                        ('1e3', "'1e3' is not an integer")):
        assert argparse_error(capsys, main, ['run', 'x.gin', '--jobs', value]) == \
            f'python -m runtime.sweep run: error: argument --jobs: {says}'
    assert argparse_error(capsys, main, ['run', 'x.gin', '--mem-gb=-inf']).endswith(
        'argument --mem-gb: -inf is not a finite number')


# ------------------------------------------------------------------------------------------------ field reference

def test_committed_field_reference_is_current():
    assert (ROOT / 'docs' / 'fields.md').read_text() == fields.markdown(), \
        'docs/fields.md is stale: python -m compiler --fields > docs/fields.md'


def test_every_field_of_every_configurable_has_type_default_and_meaning():
    text = fields.markdown()
    notes = fields.comments()
    for name, cls in CONFIGURABLES.items():
        assert f'## {name}\n' in text
        for f in dataclasses.fields(cls):  # the fields, not class constants (LATER_FIELDS)
            if f.name == 'scope':
                continue
            assert notes.get((name, f.name)), f'{name}.{f.name} has no comment in compiler/plan.py'
            row = next(ln for ln in text.split(f'## {name}\n', 1)[1].splitlines() if ln.startswith(f'| `{f.name}` |'))
            assert row.count(' | ') == 3 and not row.endswith('|  |'), row
    assert "| `decay` | 'cosine' \\| 'linear' \\| 'constant' | `'cosine'` |" in text
    assert '| `curriculum` | list[Stage] | `[Stage()]` |' in text


def test_fields_cli_prints_the_reference(capsys):
    from compiler.__main__ import main
    main(['--fields'])
    assert capsys.readouterr().out == fields.markdown()


# ------------------------------------------------------------------------------------------------ checkpoint_every

def test_checkpoint_every_scales_with_steps_scale():
    plain = load(['specs/frozen_encoder_curriculum.gin'], [])
    assert plain.plan.run.checkpoint_every == 200
    scaled = load(['specs/frozen_encoder_curriculum.gin'], ['Run.steps_scale = 0.01'])
    assert scaled.plan.run.checkpoint_every == 2
    assert [s.steps for s in scaled.plan.curriculum] == [8, 9, 2, 3]
    tiny = load(['specs/frozen_encoder_curriculum.gin'], ['Run.steps_scale = 0.001', 'Run.checkpoint_every = 7'])
    assert tiny.plan.run.checkpoint_every == 1  # at least one step
    big = load(['specs/frozen_encoder_curriculum.gin'], ['Run.steps_scale = 3', 'Run.checkpoint_every = 5'])
    assert big.plan.run.checkpoint_every == 15


def test_resume_line_names_the_step():
    from runtime.run import Resume, resume_line
    plan = load(['specs/frozen_encoder_curriculum.gin'], ['Run.steps_scale = 0.01']).plan
    run = SimpleNamespace(name='3-abcdef0123')
    assert resume_line(plan, Resume(run, None, {'stage': 1, 'step': 4})) == \
        'resuming run 3-abcdef0123 at step 12 of 22 (stage 2/4 blank_copy, step 4 of 9)'
    assert resume_line(plan, Resume(run, None, None)) == \
        'resuming run 3-abcdef0123 at step 0 of 22: it was stopped before its first checkpoint, so it starts again'


# ------------------------------------------------------------------------------------------------ group

def final_values(grid, name):
    """run -> the metric's value at its last step, read straight from the table."""
    got = rows(grid.path, 'SELECT run_id, step, value FROM memspec_metrics WHERE name = ? ORDER BY run_id, step', name)
    out = {}
    for run_id, _, value in got:
        out[run_id] = value
    return out


def test_group_mean_and_standard_error_over_seeds(grid, capsys):
    doc = json.loads(cli(capsys, 'group', 'autoencode/Stage.lr', '--name', 'train/loss', '--json', '--db', grid.db).out)
    finals = final_values(grid, 'train/loss')
    assert [g['values'] for g in doc] == [{'autoencode/Stage.lr': 0.001}, {'autoencode/Stage.lr': 0.002}]
    assert [g['runs'] for g in doc] == [['0', '1'], ['2', '3']]
    assert [g['seeds'] for g in doc] == [[0, 1], [0, 1]]
    for g in doc:
        xs = [finals[i] for i in g['runs']]
        m = g['metrics']['train/loss']
        assert m['n'] == 2
        assert m['mean'] == pytest.approx(sum(xs) / 2, rel=1e-12)
        assert m['stderr'] == pytest.approx(abs(xs[0] - xs[1]) / 2, rel=1e-9)  # sd(n-1) / sqrt(2) of two values


def test_group_text_csv_and_two_keys(grid, capsys):
    out = cli(capsys, 'group', 'autoencode/Stage.lr', '--name', 'train/loss', '--db', grid.db).out
    finals = final_values(grid, 'train/loss')
    lines = out.splitlines()
    assert lines[0] == ("4 runs in 2 groups by autoencode/Stage.lr (each metric's final value: mean ± standard error "
                        'over the runs of a group)')
    a = [finals['0'], finals['1']]
    assert lines[3].split() == ['0.001', '2', '0,1', f'{statistics.fmean(a):.4f}', '±',
                                f'{statistics.stdev(a) / math.sqrt(2):.4f}']
    csv_out = cli(capsys, 'group', 'autoencode/Stage.lr', 'Run.seed', '--name', 'train/loss', '--csv',
                  '--db', grid.db).out
    head, *body = csv_out.strip().splitlines()
    assert head == ('autoencode/Stage.lr,Run.seed,runs,seeds,train/loss:mean,train/loss:stderr,train/loss:n')
    assert len(body) == 4 and all(r.endswith(',,1') for r in body)  # one run per group: no standard error
    assert body[0].split(',')[4] == repr(finals['0'])


def test_group_refusals(grid, capsys):
    err = cli_error(capsys, 'group', 'Memory.chunkz', '--db', grid.db)
    assert "Memory has no field 'chunkz'" in err and "did you mean 'chunks'?" in err
    err = cli_error(capsys, 'group', 'NO_SUCH_MACRO', '--db', grid.db)
    assert err.startswith('error: group NO_SUCH_MACRO: no run of this selection has this key')


def cli_error(capsys, *args) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        R.main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and '\n  fix: ' in err and 'Traceback' not in err, err
    return err


# ------------------------------------------------------------------------------------------------ tags and notes

def test_tags_and_notes_show_in_list_and_show_and_filter(grid, capsys):
    assert cli(capsys, 'tag', '1', 'baseline', 'lr:1e-3', '--db', grid.db).out == 'run 1 tags: baseline, lr:1e-3\n'
    assert cli(capsys, 'tag', '2', 'baseline', '--db', grid.db).out == 'run 2 tags: baseline\n'
    assert cli(capsys, 'note', '1', 'loss', 'flat;', 'retry', '--db', grid.db).out == 'run 1 note: loss flat; retry\n'
    out = cli(capsys, 'list', '--tag', 'baseline', '--db', grid.db).out
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == ['1', '2']
    assert out.splitlines()[2].endswith('[baseline, lr:1e-3] loss flat; retry')
    assert [d['id'] for d in json.loads(cli(capsys, 'list', '--tag', 'baseline', '--tag', 'lr:1e-3', '--json',
                                            '--db', grid.db).out)] == ['1']
    shown = cli(capsys, 'show', '1', '--db', grid.db).out
    assert 'tags        baseline, lr:1e-3\nnote        loss flat; retry\n' in shown
    doc = json.loads(cli(capsys, 'show', '1', '--json', '--db', grid.db).out)
    assert doc['tags'] == ['baseline', 'lr:1e-3'] and doc['note'] == 'loss flat; retry'
    assert cli(capsys, 'tag', '1', 'baseline', '--remove', '--db', grid.db).out == 'run 1 tags: lr:1e-3\n'
    assert cli(capsys, 'note', '1', '', '--db', grid.db).out == 'run 1: note removed\n'
    assert json.loads(cli(capsys, 'show', '1', '--json', '--db', grid.db).out)['note'] is None
    assert cli_error(capsys, 'tag', '1', 'two words', '--db', grid.db).startswith(
        "error: tag 'two words': a tag is 1 to 64 letters, digits or _-.:+=/ (no spaces)")
    assert cli_error(capsys, 'tag', '17', 'x', '--db', grid.db).startswith("error: RUN 17: no run matches '17'")


# ------------------------------------------------------------------------------------------------ delete

def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob('*'))
            if p.is_file()}


def run_column(path, table) -> int:
    return [c[1] for c in rows(path, f'PRAGMA table_info({table})')].index('run_id')


def run_rows(path) -> dict:
    tables = ('run', 'artifact', 'runs_resources', 'memspec_metrics', 'memspec_labels')
    have = {t for (t,) in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {t: sorted(rows(path, f'SELECT * FROM {t}')) for t in tables if t in have}


def test_delete_asks_refuses_a_live_run_and_removes_only_that_run(grid, capsys, monkeypatch, tmp_path):
    folders = {p.name.split('-')[0]: p for p in grid.out.iterdir() if p.is_dir() and '-' in p.name}
    store = grid.out / 'memories.zarr'
    assert (store / folders['3'].name).is_dir()
    before = run_rows(grid.path)
    others = {k: tree_digest(v) for k, v in folders.items() if k != '3'}
    other_groups = {k: tree_digest(store / v.name) for k, v in folders.items() if k != '3'}
    # no terminal, no --yes: refused, nothing changed
    monkeypatch.setattr(sys, 'stdin', SimpleNamespace(isatty=lambda: False, readline=lambda: 'y\n'))
    err = cli_error(capsys, 'delete', '3', '--db', grid.db)
    assert err == ('error: delete 3: deleting needs a confirmation and stdin is not a terminal\n'
                   '  fix: pass --yes to delete without asking\n')
    # a terminal answering no: nothing changed
    monkeypatch.setattr(sys, 'stdin', SimpleNamespace(isatty=lambda: True, readline=lambda: 'n\n'))
    assert cli(capsys, 'delete', '3', '--db', grid.db).err.endswith('delete run 3? [y/N] nothing deleted\n')
    assert run_rows(grid.path) == before and folders['3'].is_dir()
    # a live run (RUNNING, fresh heartbeat) is refused
    live = tmp_path / 'live.db'
    src, conn = sqlite3.connect(grid.path), sqlite3.connect(live)
    src.backup(conn)  # the database is in WAL mode: copying its file alone would miss the log
    src.close()
    conn.execute("UPDATE run SET status = 'RUNNING', heartbeat = datetime('now') WHERE run_id = '3'")
    conn.commit()
    conn.close()
    err = cli_error(capsys, 'delete', '3', '--yes', '--db', f'sqlite:///{live}')
    assert 'error: delete 3: the run is RUNNING (its heartbeat is fresh)' in err
    assert folders['3'].is_dir()
    # yes: its rows, folder and memory group go; nothing of another run changes
    monkeypatch.setattr(sys, 'stdin', SimpleNamespace(isatty=lambda: True, readline=lambda: 'yes\n'))
    err = cli(capsys, 'delete', '3', '--db', grid.db).err
    assert f'  run folder   {folders["3"]}\n  memories     {store / folders["3"].name}\n' in err
    assert err.endswith(f'deleted run 3, {folders["3"]}, {store / folders["3"].name}\n')
    assert not folders['3'].exists() and not (store / folders['3'].name).exists()
    after = run_rows(grid.path)
    for table, got in after.items():  # every other run's rows exactly as before, none of run 3's
        assert got == [r for r in before[table] if str(r[run_column(grid.path, table)]) != '3'], table
    assert [r[0] for r in rows(grid.path, 'SELECT run_id FROM run ORDER BY id')] == ['0', '1', '2']
    assert {k: tree_digest(v) for k, v in folders.items() if k != '3'} == others
    assert {k: tree_digest(store / v.name) for k, v in folders.items() if k != '3'} == other_groups
    consolidated = json.loads((store / 'zarr.json').read_text())['consolidated_metadata']['metadata']
    assert not any(k.startswith(folders['3'].name) for k in consolidated)
    assert any(k.startswith(folders['0'].name) for k in consolidated)
    assert cli_error(capsys, 'delete', '3', '--yes', '--db', grid.db).startswith("error: RUN 3: no run matches '3'")


# ------------------------------------------------------------------------------------------------ curves

def test_curve_styles():
    blue, orange = (0.1, 0.2, 0.7, 1.0), (0.9, 0.5, 0.1, 1.0)
    one = [plots.line(0, j, 1, blue, c, 500) for j, c in enumerate([blue, orange])]
    assert [k['color'] for k in one] == [blue, orange]  # one run: a colour per metric
    assert all(k['marker'] == '' for k in one)
    several = [plots.line(0, j, 3, blue, orange, 500) for j in range(2)]
    assert several[0]['color'] == blue and several[1]['color'] != blue  # shades of the run's colour
    assert several[0]['linestyle'] != several[1]['linestyle']
    assert plots.line(0, 0, 1, blue, blue, 1)['marker'] == 'o'  # a value logged once is a visible point
    assert plots.line(1, 0, 3, blue, blue, plots.FEW)['marker'] == 'o'


def test_legend_labels_name_the_grid_values(grid):
    from store.database import open_db
    db = open_db(grid.db)
    got = R.grid_labels([db.runs(run_id=i)[0] for i in ('0', '1', '2')])
    assert got == ['run 0  autoencode/Stage.lr=1e-3, Run.seed=0', 'run 1  autoencode/Stage.lr=1e-3, Run.seed=1',
                   'run 2  autoencode/Stage.lr=2e-3, Run.seed=0']
    assert R.grid_labels([db.runs(run_id='0')[0]]) == ['run 0  autoencoder.gin']


def test_progress_counts_stages_done_from_end_step_metrics(grid, capsys, tmp_path):
    """A live or killed run's info (stage end steps) is saved with Sacred's heartbeat, every 10 s, and lags; the eval
    metrics at a stage's last step are written when logged: either says the stage is done."""
    db = tmp_path / 'lagging.db'
    src, conn = sqlite3.connect(grid.path), sqlite3.connect(db)
    src.backup(conn)
    src.close()
    for run_id, info in conn.execute('SELECT run_id, info FROM run').fetchall():
        info = json.loads(info)
        info.pop('stages', None)  # the heartbeat that would have saved them never came
        conn.execute("UPDATE run SET status = 'INTERRUPTED', info = ? WHERE run_id = ?", (json.dumps(info), run_id))
    conn.execute("DELETE FROM memspec_metrics WHERE run_id = '1' AND name LIKE 'eval/%'")  # killed before its eval
    conn.commit()
    conn.close()
    out = cli(capsys, 'list', '--db', f'sqlite:///{db}').out
    stages = {ln.split()[0]: ln.split('INTERRUPTED')[1].split()[:3] for ln in out.splitlines()[2:]
              if ln.split()[0] in ('0', '1', '2')}  # run 3 may have been deleted by then
    assert stages == {'0': ['autoencode', '(1/1', 'done)'], '1': ['autoencode', '(0/1', 'done)'],
                      '2': ['autoencode', '(1/1', 'done)']}


@pytest.fixture(scope='module')
def pg_run(tmp_path_factory):
    """One tiny run recorded in a throwaway PostgreSQL database (MEMSPEC_TEST_POSTGRES or a local server; else
    skipped, as tests/test_runs.py's PostgreSQL tests)."""
    from test_runs import Pg
    pg = Pg()
    if pg.url is None:
        pytest.skip(pg.reason)
    out = tmp_path_factory.mktemp('pg')
    b = [f"Run.out_dir='{out}'", f"Data.cache_dir='{out / 'cache'}'", *TINY]
    argv = ['specs/autoencoder.gin'] + [x for kv in b for x in ('-b', kv)] + ['--db', pg.record_url]
    p = subprocess.run([sys.executable, '-c', BUILD, json.dumps([argv])], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    yield SimpleNamespace(pg=pg, out=out)
    pg.drop()


def test_tag_note_and_delete_on_postgresql(pg_run, capsys):
    pg, url = pg_run.pg, pg_run.pg.url
    (run_id,) = [r[0] for r in pg.rows('SELECT run_id FROM run')]
    assert cli(capsys, 'tag', run_id, 'pg', '--db', url).out == f'run {run_id} tags: pg\n'
    assert cli(capsys, 'note', run_id, 'on postgres', '--db', url).out == f'run {run_id} note: on postgres\n'
    assert json.loads(cli(capsys, 'list', '--tag', 'pg', '--json', '--db', url).out)[0]['note'] == 'on postgres'
    assert pg.rows('SELECT COUNT(*) FROM memspec_metrics WHERE run_id = %s', run_id)[0][0] > 0
    cli(capsys, 'delete', run_id, '--yes', '--db', url)
    for table in ('run', 'memspec_metrics', 'memspec_labels', 'artifact', 'runs_resources'):
        assert pg.rows(f'SELECT COUNT(*) FROM {table} WHERE run_id = %s', run_id) == [(0,)], table
    assert not [p for p in pg_run.out.iterdir() if p.name.startswith(f'{run_id}-')]
