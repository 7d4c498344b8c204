"""What memspec reads or is given is not trusted: secrets in run database URLs of any shape appear in no output, file
or row (store/urls.py); a SQLite file that belongs to another program is refused before a byte of it changes; a run
database on a read-only mount is still read; damaged run rows are named, not crashed on (store/database.py)."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT, in_process, rt_argv, rt_main, rt_run_ids

from compiler.errors import UserError

SECRET = f'Zq7-{uuid.uuid4().hex[:10]}-XK9'  # made at run time: no source file or diff holds it

# (URL, the secrets it carries): every shape a URL can hide a secret in
URLS = [
    (f'postgresql://adv:{SECRET}@localhost/runs', [SECRET]),
    (f'postgresql://adv@localhost/runs?password={SECRET}', [SECRET]),
    (f'postgresql://adv@localhost/runs?sslmode=require&PASSWORD={SECRET}', [SECRET]),
    (f'postgresql://adv@localhost/runs?pass%77ord={SECRET}', [SECRET]),
    (f'postgresql://adv@localhost/runs?passwd={SECRET}&pwd={SECRET}x', [SECRET]),
    (f'postgresql://adv@localhost/runs?sslpassword={SECRET}', [SECRET]),
    (f'postgresql://h/runs?api_key={SECRET};token={SECRET}2', [SECRET]),
    (f'postgresql://h/runs?Secret={SECRET}&access_key=k{SECRET}', [SECRET]),
    (f'postgresql://h/runs?options=-c%20password%3D{SECRET}', [SECRET]),
    (f'postgresql://adv:p@ss/w?rd{SECRET}@localhost:5432/runs', [f'p@ss/w?rd{SECRET}', f'rd{SECRET}']),
    (f'postgresql://adv:{SECRET}%40x@localhost/runs', [SECRET]),
    (f'postgresql://adv:{SECRET}@localhost:notaport/runs', [SECRET]),
    (f'sqlite:///runs/sacred.db#{SECRET}', [SECRET]),
    (f'sqlite:///runs/sacred.db?token={SECRET}', [SECRET]),
    (f'mongodb://adv:{SECRET}@h1,h2/?authSource=admin', [SECRET]),
    (f'host=localhost dbname=runs user=adv password={SECRET}', [SECRET]),
    (f"host=localhost password='{SECRET} with blanks' dbname=runs", [f'{SECRET} with blanks']),
    (f'dbname=runs PassWord = {SECRET}', [SECRET]),
]


@pytest.mark.parametrize('url,secrets', URLS)
def test_every_shape_of_url_is_shown_without_its_secret(url, secrets):
    from store.database import display_url, first_line, redact
    shown = display_url(url)
    assert '***' in shown and not any(s in shown for s in secrets), shown
    # a driver's message may quote the URL, or the secret raw, %-decoded or %-encoded: all go
    from urllib.parse import quote, unquote
    text = f'FATAL: {url} failed; ' + ' '.join(f'{s} {quote(s, safe="")} {unquote(s)}' for s in secrets)
    assert not any(s in redact(text, url) for s in secrets), redact(text, url)
    assert SECRET not in first_line(RuntimeError(text), url)


def test_urls_without_secrets_are_shown_as_given():
    from store.database import display_url
    for url in ('sqlite:///runs/sacred.db', 'postgresql://adv@localhost:5432/runs?sslmode=require',
                'mongodb://h1,h2/?replicaSet=rs0', 'runs/sacred.db'):
        assert display_url(url) == url


@pytest.mark.parametrize('url,secrets', [u for u in URLS if not u[0].startswith('sqlite')])
def test_every_reader_and_writer_refuses_such_a_url_without_echoing_it(url, secrets, capsys):
    from runtime import record
    from store import analyze, export, runs
    try:
        record.check_lasting(url)
        record.observer(url)
    except UserError as e:
        assert not any(s in str(e) for s in secrets), str(e)
    for main, argv in ((runs.main, ['list', '--db', url]), (runs.main, ['show', '0', '--db', url]),
                       (analyze.main, ['info', '0', '--db', url]), (export.main, ['0', '/nonexistent/x', '--db', url])):
        code, out, err = in_process(main, argv, capsys)
        assert code == 2 and 'Traceback' not in err, err
        assert not any(s in out + err for s in secrets), out + err


def copy_db(src, dst) -> None:
    """A consistent copy of a run database (the test session may still hold it open, with rows in its -wal), in
    WAL mode as memspec leaves its databases, closed."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    b.execute('PRAGMA journal_mode=WAL')
    a.close()
    b.close()


def _texts(folder) -> dict:
    """Every file under `folder` (bytes), by path."""
    return {p: p.read_bytes() for p in folder.rglob('*') if p.is_file()}


def test_a_run_recorded_through_a_url_with_secrets_leaks_them_nowhere(tmp_path, rt_cache, capsys):
    """A whole run, store.runs and store.export through `sqlite:///...?password=...&api_key=...` (SQLite ignores
    the parameters, so the run succeeds): stdout, stderr, every file of the out_dir and the export, every cell of
    every table of the database."""
    from store import export, runs
    out = tmp_path / 'runs'
    db = out / 'sacred.db'
    url = f'sqlite:///{db}?password={SECRET}&api_key=k{SECRET}'
    argv = rt_argv('specs/autoencoder.gin', out, rt_cache, ['Data.vocab_size=300', 'D_MODEL=16', 'N_HEADS=2',
                                                            'autoencode/Stage.steps=1', 'Run.eval_batches=1',
                                                            "Run.memory_store='none'"], ['--db', url])
    assert rt_main(argv) == 0
    shown = capsys.readouterr()
    (run_id,) = rt_run_ids(out)
    streams = shown.out + shown.err
    for main, args in ((runs.main, ['list', '--db', url]), (runs.main, ['show', run_id, '--db', url]),
                       (runs.main, ['show', run_id, '--json', '--db', url]),
                       (export.main, [run_id, str(tmp_path / 'export'), '--db', url]),
                       (export.main, [run_id, str(tmp_path / 'export'), '--db', url])):  # refused: OUT exists
        code, o, e = in_process(main, args, capsys)
        assert code in (0, 2) and 'Traceback' not in e, e
        streams += o + e
    assert 'password=***' in streams and SECRET not in streams
    files = {**_texts(out), **_texts(tmp_path / 'export')}
    assert (tmp_path / 'export' / 'config.json') in files and any(p.name == 'run.json' for p in files)
    leaks = [str(p) for p, b in files.items() if SECRET.encode() in b and p != db]
    assert not leaks, leaks
    con = sqlite3.connect(db)
    try:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for row in con.execute(f'SELECT * FROM "{table}"').fetchall():
                assert not any(SECRET.encode() in (c if isinstance(c, bytes) else str(c).encode()) for c in row), \
                    (table, row)
    finally:
        con.close()
    cfg = json.loads((tmp_path / 'export' / 'config.json').read_text())
    assert cfg['run']['database'] == f'sqlite:///{db}?password=***&api_key=***'


# ------------------------------------------------------------------------------------------------ foreign databases

def _foreign_files(tmp_path) -> dict:
    """Files that are no run database: another program's SQLite (rollback journal), one that adds a table of its
    own to Sacred's, and files that are not SQLite at all."""
    other = tmp_path / 'app.db'
    con = sqlite3.connect(other)
    con.execute('CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)')
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()
    mixed = tmp_path / 'mixed.db'
    con = sqlite3.connect(mixed)
    con.execute('CREATE TABLE run (id INTEGER)')
    con.execute('CREATE TABLE invoices (id INTEGER)')
    con.commit()
    con.close()
    text = tmp_path / 'notes.db'
    text.write_text('my notes\n' * 100)
    binary = tmp_path / 'blob.db'
    binary.write_bytes(bytes(range(256)) * 8)
    return {'another program': other, 'a foreign table': mixed, 'text': text, 'binary': binary}


def test_a_database_of_another_program_is_refused_before_a_byte_changes(tmp_path, rt_cache, capsys):
    from runtime import record
    from store.database import record_evaluations
    files = _foreign_files(tmp_path)
    for what, path in files.items():
        before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file())
        url = f'sqlite:///{path}'
        with pytest.raises(UserError) as e:
            record.observer(url)
        msg = str(e.value)
        assert ('belongs to another program' in msg or 'is not a SQLite database' in msg) and \
            'nothing was written' in msg, (what, msg)
        with pytest.raises(UserError):
            record_evaluations(url, '0', [])
        out = tmp_path / f'runs-{path.stem}'
        assert rt_main(rt_argv('specs/autoencoder.gin', out, rt_cache, ['Data.vocab_size=300', 'D_MODEL=16',
                                                                       'N_HEADS=2', 'autoencode/Stage.steps=1'],
                               ['--db', url])) == 2
        err = capsys.readouterr().err
        assert str(path) in err and 'Traceback' not in err, err
        after = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir() if p.is_file())
        assert after == before, what  # same bytes, and no -wal / -shm / -journal beside it
        assert not out.exists()


def test_an_empty_file_and_a_run_database_are_accepted(tmp_path):
    from store.sqlite_files import check_own_database
    empty = tmp_path / 'empty.db'
    empty.touch()
    check_own_database(f'sqlite:///{empty}')
    check_own_database(f'sqlite:///{tmp_path / "new.db"}')
    ours = tmp_path / 'ours.db'
    con = sqlite3.connect(ours)
    for t in ('run', 'host', 'experiment', 'memspec_metrics', 'memspec_anything_new'):
        con.execute(f'CREATE TABLE {t} (id INTEGER)')
    con.execute('CREATE TABLE t_autoinc (id INTEGER PRIMARY KEY AUTOINCREMENT)')  # creates sqlite_sequence
    con.execute('DROP TABLE t_autoinc')
    con.commit()
    con.close()
    check_own_database(f'sqlite:///{ours}')


# ------------------------------------------------------------------------------------------------ read-only mounts

READ_ONLY_LIST = """
import sys
from store import runs
try:
    runs.main(['list', '--db', 'sqlite:///' + sys.argv[1]])
except SystemExit as e:
    sys.exit(e.code)
"""


def _read_only(folder) -> list[str] | None:
    """A command prefix that runs its command with `folder` read-only: a private read-only bind mount for root
    (whom permissions do not stop), else the folder's permissions. None where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which('unshare') is None:
        return None
    probe = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount --bind {folder} {folder} && mount -o remount,ro,bind '
                            f'{folder} {folder} && ! touch {folder}/.probe'], capture_output=True, timeout=600)
    if probe.returncode != 0:
        return None
    return ['unshare', '-m', 'sh', '-c', f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} '
            f'{folder} && exec "$@"', 'sh']


def test_a_wal_database_on_a_read_only_mount_is_listed(flagship_run, tmp_path):
    folder = tmp_path / 'ro'
    folder.mkdir()
    copy_db(flagship_run.db, folder / 'sacred.db')  # in WAL mode, closed cleanly: no -wal file beside it
    with open(folder / 'sacred.db', 'rb') as f:  # header bytes 18-19: 2 = WAL
        assert f.read(20)[18:20] == b'\x02\x02'
    assert sorted(x.name for x in folder.iterdir()) == ['sacred.db']
    prefix = _read_only(folder)
    if prefix is None:
        pytest.skip('no way to make a read-only folder here (root without unshare)')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        p = subprocess.run([*prefix, sys.executable, '-c', READ_ONLY_LIST, str(folder / 'sacred.db')], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    finally:
        folder.chmod(0o755)
    assert p.returncode == 0, p.stderr
    assert f'{flagship_run.run_id} ' in p.stdout and 'COMPLETED' in p.stdout, p.stdout
    assert sorted(x.name for x in folder.iterdir()) == ['sacred.db']


def test_a_read_only_wal_database_with_pending_changes_says_so(tmp_path, monkeypatch):
    """A -wal file that holds changes cannot be read without writing beside it: the message says which files to
    copy, not that the file is no SQLite database."""
    from store import sqlite_files
    db = tmp_path / 'sacred.db'
    db.write_bytes(b'')
    (tmp_path / 'sacred.db-wal').write_bytes(b'x' * 100)
    real = sqlite3.connect

    def cannot_open(name, *a, **k):
        if 'mode=ro' in str(name):
            raise sqlite3.OperationalError('unable to open database file')
        return real(name, *a, **k)
    monkeypatch.setattr(sqlite_files.sqlite3, 'connect', cannot_open)
    with pytest.raises(UserError) as e:
        sqlite_files.connect_readonly(db, '--db x')
    assert 'its folder is read-only and sacred.db-wal holds changes' in e.value.what
    assert 'copy sacred.db, sacred.db-wal and sacred.db-shm together' in e.value.fix


# ------------------------------------------------------------------------------------------------ damaged rows

DAMAGE = {
    'info not JSON': ("UPDATE run SET info = '{not json' WHERE run_id = ?", 'info (not JSON)'),
    'info a list': ("UPDATE run SET info = '[1, 2]' WHERE run_id = ?", 'info (a list, not an object)'),
    'info.stages a number': ("""UPDATE run SET info = json_set(info, '$.stages', 5) WHERE run_id = ?""",
                             'info.stages (a number, not an object)'),
    'info.stages end_step text': ("""UPDATE run SET info = json_set(info, '$.stages.copy.end_step', 'x')
                                     WHERE run_id = ?""", 'info.stages (an end_step that is not a whole number)'),
    'info.run_dir a number': ("UPDATE run SET info = json_set(info, '$.run_dir', 7) WHERE run_id = ?",
                              'info.run_dir (a number, not a string)'),
    'config not JSON': ("UPDATE run SET config = 'x' WHERE run_id = ?", 'config (not JSON)'),
    'config.bindings a string': ("UPDATE run SET config = json_set(config, '$.bindings', 'a=1') WHERE run_id = ?",
                                 'config.bindings (a string, not a list)'),
    'config.bindings numbers': ("UPDATE run SET config = json_set(config, '$.bindings', json('[1, 2]')) "
                                'WHERE run_id = ?', 'config.bindings (holds items that are not a string)'),
    'config.plan a list': ("UPDATE run SET config = json_set(config, '$.plan', json('[]')) WHERE run_id = ?",
                           'config.plan (a list, not an object)'),
    'config deeply nested': ("UPDATE run SET config = ? WHERE run_id = ?", 'config (not JSON)'),
    'config nested deeper than the limit': ("UPDATE run SET config = ? WHERE run_id = ?",
                                            'config (nested deeper than 64 levels)'),
    'result text': ("UPDATE run SET result = 'abc' WHERE run_id = ?", 'result (a string, not a number)'),
    'start_time garbage': ("UPDATE run SET start_time = 'yesterday' WHERE run_id = ?", 'start_time (not a time)'),
    'status unknown': ("UPDATE run SET status = 'EXPLODED' WHERE run_id = ?", "status ('EXPLODED' is no Sacred "
                                                                            'status)'),
}


@pytest.mark.parametrize('column,value', [('value', "'abc'"), ('step', "'x'"), ('step', '2.5')])
def test_a_damaged_metric_row_is_named(column, value, flagship_run, tmp_path, capsys):
    from store import runs
    db = tmp_path / 'sacred.db'
    copy_db(flagship_run.db, db)
    con = sqlite3.connect(db)
    con.execute(f"UPDATE memspec_metrics SET {column} = {value} WHERE name = 'eval/copy.ce'")
    con.commit()
    con.close()
    url = f'sqlite:///{db}'
    code, out, err = in_process(runs.main, ['list', '--db', url], capsys)
    assert code == 0 and 'Traceback' not in err, err
    for argv in (['metrics', flagship_run.run_id], ['show', flagship_run.run_id]):
        code, out, err = in_process(runs.main, [*argv, '--db', url], capsys)
        if argv[0] == 'show' and column == 'step':  # show reads stage-end steps only: it never meets the row
            assert code == 0 and 'Traceback' not in err, err
            continue
        assert code == 2 and 'Traceback' not in err, err
        assert f"run {flagship_run.run_id}: its recorded metric 'eval/copy.ce' is damaged" in err, err


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_a_damaged_run_row_is_named_not_crashed_on(damage, flagship_run, tmp_path, capsys):
    from store import analyze, export, runs
    db = tmp_path / 'sacred.db'
    copy_db(flagship_run.db, db)
    sql, named = DAMAGE[damage]
    args = (flagship_run.run_id,)
    if damage == 'config deeply nested':
        args = ('[' * 100000 + ']' * 100000, flagship_run.run_id)  # json.loads: RecursionError
    elif damage == 'config nested deeper than the limit':
        args = ('{"plan": ' + '[' * 200 + ']' * 200 + '}', flagship_run.run_id)
    con = sqlite3.connect(db)
    con.execute(sql, args)
    con.commit()
    con.close()
    url = f'sqlite:///{db}'
    code, out, err = in_process(runs.main, ['list', '--db', url], capsys)
    assert code == 0 and 'damaged: ' + named.split(' (')[0] in out, out + err
    for main, argv in ((runs.main, ['show', flagship_run.run_id, '--db', url]),
                       (runs.main, ['metrics', flagship_run.run_id, '--db', url]),
                       (export.main, [flagship_run.run_id, str(tmp_path / 'x'), '--db', url]),
                       (analyze.main, ['info', flagship_run.run_id, '--db', url])):
        code, out, err = in_process(main, argv, capsys)
        assert 'Traceback' not in err and code in (0, 2), (argv, err)
        if main is not analyze.main:  # analyze reads the memory store (none here) before the run
            assert code == 2 and f'run {flagship_run.run_id}: its record is damaged: {named}' in err, (argv, err)
    assert not (tmp_path / 'x').exists()


# ------------------------------------------------------------------------------------------------ spec files

LEAK = 'hunter2Xyzzy'
# statements an included file (a credentials file named by mistake) may hold, each an error of another kind
INCLUDED = [f'import {LEAK}', f'x/y.z = @{LEAK}', f'Memory.{LEAK} = 1', f'{LEAK}.x = 1', f'Memory.chunks = %{LEAK}',
            f"include '{LEAK}'", f"include 'sub/{LEAK}.gin'", f'password = {LEAK}', f'{LEAK}', f'a = [{LEAK}',
            f'token = "{LEAK}" extra', f'Stage.objectives = [@{LEAK}/Objective()]', f'key: {LEAK}',
            f"Run.name = '{LEAK}", f'{{{LEAK}}}']


@pytest.mark.parametrize('text', INCLUDED)
@pytest.mark.parametrize('depth', ['included', 'nested', 'with -b'])
def test_an_included_file_is_never_echoed(text, depth, tmp_path):
    from compiler.spec import load
    (tmp_path / 'creds.txt').write_text(f'# a comment\n{text}\n')
    (tmp_path / 'middle.gin').write_text("include 'creds.txt'\n")
    top = tmp_path / 'top.gin'
    top.write_text("include 'memory_clm.gin'\n" + ("include 'middle.gin'\n" if depth == 'nested' else
                                                    "include 'creds.txt'\n"))
    with pytest.raises(UserError) as e:
        load([str(top)], ['Memory.chunks = 2'] if depth == 'with -b' else [])
    assert LEAK.lower() not in str(e.value).lower(), str(e.value)
    assert e.value.where.endswith('creds.txt:2'), e.value.where


def test_the_users_own_spec_and_bindings_are_still_quoted(tmp_path):
    from compiler.spec import load
    spec = tmp_path / 'mine.gin'
    spec.write_text("include 'memory_clm.gin'\nMemroy.chunks = 2\n")
    with pytest.raises(UserError) as e:
        load([str(spec)])
    assert "unknown configurable 'Memroy'" in e.value.what and "did you mean 'Memory'?" in e.value.fix
    with pytest.raises(UserError) as e:
        load(['specs/memory_clm.gin'], ['Memory.chunkz = 2'])
    assert "has no parameter 'chunkz'" in e.value.what and "did you mean 'chunks'?" in e.value.fix


@pytest.mark.parametrize('binding,what,fix', [
    ("clm/Objective.kind = 'blank_cpy'", "Objective.kind = 'blank_cpy' is not one of",
     "did you mean 'blank_copy'? bind Objective.kind to one of 'clm', "),
    ("Plan.family = 'memry'", "Plan.family = 'memry' is not one of", "did you mean 'memory'? "),
    ("Memory.position = 'secnd_last'", "Memory.position = 'secnd_last' is not one of", "did you mean 'second_last'? "),
    ("clm/Stage.freeze = ['decodr']", "freezes 'decodr', which the 'memory' graph does not have",
     "did you mean 'decoder'? freeze one of: "),
    ("clm/Stage.init_from = {'encodr': 'run:0/x'}", "initialises 'encodr'", "did you mean 'encoder'? use one of: "),
    ("clm/Stage.freeze = [1, 2]", 'is not a list of strings', 'bind Stage.freeze to a list of strings'),
])
def test_wrong_choices_say_what_was_meant(binding, what, fix):
    from compiler.spec import load
    with pytest.raises(UserError) as e:
        load(['specs/memory_clm.gin'], [binding])
    assert what in e.value.what and fix in e.value.fix, (e.value.what, e.value.fix)
    assert 'a list of a ' not in e.value.what + e.value.fix


# ------------------------------------------------------------------------------------------------ memory stores

GARBLED = {  # attribute -> a value the format never writes, and what the message says
    'rows': ('many', 'group attribute rows = '),
    'complete': ('yes', "group attribute complete = 'yes' is not true or false"),
    'chunks': (-3, 'group attribute chunks = -3 is negative'),
    'chunk_len': (99, 'group attribute chunk_len = 99 does not match the data'),
    'memory_dim': (7, 'group attribute memory_dim = 7 does not match the data'),
    'dtype': ('bfloat16', "group attribute dtype = 'bfloat16' does not match the data (the arrays hold float32 "
                          'values)'),
    'storage_dtype': ('uint16', "group attribute storage_dtype = 'uint16' does not match the data"),
    'dtype ': ('float64', "group attribute dtype = 'float64' is not one of float32, bfloat16"),
    'checkpoint_path': (['a', 'b'], 'group attribute checkpoint_path = '),
    'tokenizer_path': ({'x': 1}, 'group attribute tokenizer_path = '),
    'run_key': (5, 'group attribute run_key = 5 is not text'),
    'bytes_per_token': (-1.0, 'bytes_per_token = -1.0 is not a positive number'),
    'stage': ('other', "does not name this group's stage"),
    'version': ('3', 'written by an incompatible version'),
}


@pytest.mark.parametrize('attr', list(GARBLED))
def test_garbled_group_attributes_are_one_message(attr, stored_run, tmp_path, capsys):
    from store import analyze
    from store import memories as M
    store = tmp_path / 'memories.zarr'
    shutil.copytree(stored_run.store, store)
    value, said = GARBLED[attr]
    # autoencode holds the arrays; the frozen-encoder stages after it refer to them (shared memories)
    assert M.open_group(stored_run.store, stored_run.name, 'copy').stored_in == 'autoencode'
    meta_file = store / stored_run.name / 'autoencode' / 'zarr.json'
    meta = json.loads(meta_file.read_text())
    meta['attributes'][attr.strip()] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        M.open_group(store, stored_run.name, 'autoencode')
    assert said in e.value.what and 'autoencode' in e.value.where, e.value.what
    for argv in (['info', stored_run.run_id, '--store', store, '--stage', 'autoencode'],
                 ['decode', stored_run.run_id, '--store', store, '--stage', 'copy', '-n', '1']):
        code, out, err = in_process(analyze.main, argv, capsys)
        assert code == 2 and said in err and 'Traceback' not in err, (argv, code, err)
    listed = {e['stage']: e for e in M.listing(store)}
    assert listed['autoencode'].get('damaged'), listed['autoencode']
    assert 'damaged' not in listed['copy']


def test_attributes_that_are_not_json_objects_are_one_message(stored_run, tmp_path, capsys):
    from store import analyze
    store = tmp_path / 'memories.zarr'
    shutil.copytree(stored_run.store, store)
    meta_file = store / stored_run.name / 'copy' / 'zarr.json'
    meta = json.loads(meta_file.read_text())
    for garbage in ([1, 2], 'text', None):
        meta['attributes'] = garbage
        meta_file.write_text(json.dumps(meta))
        code, out, err = in_process(analyze.main, ['info', stored_run.run_id, '--store', store, '--stage', 'copy'],
                                    capsys)
        assert code == 2 and 'copy' in err and 'Traceback' not in err, (garbage, err)
    meta_file.write_text('{"attributes": ')
    code, out, err = in_process(analyze.main, ['info', stored_run.run_id, '--store', store], capsys)
    assert code == 2 and 'Traceback' not in err, err


PIECE = uuid.uuid4().hex[:10]
PG_SECRET = f'Zq7@{PIECE}/XK9'  # '@' and '/' must be %-encoded in a URL: the masker sees them both ways


@pytest.mark.parametrize('shape', ['userinfo', 'query'])
def test_a_postgresql_run_with_a_password_in_the_url_leaks_it_nowhere(shape, pg_url, tmp_path, rt_cache, capsys):
    """A real PostgreSQL role with a password, given in the userinfo or as ?password=: a run, a refused run with a
    wrong password, store.runs and store.export; no stream, file or row holds the password, raw or %-encoded."""
    from urllib.parse import quote

    import psycopg2
    from sqlalchemy.engine import make_url

    from store import export, runs
    role = f'memspec_pw_{uuid.uuid4().hex[:8]}'
    admin = make_url(pg_url)
    con = psycopg2.connect(admin.render_as_string(hide_password=False).replace('postgresql+psycopg2', 'postgresql'))
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (PG_SECRET,))
        cur.execute(f'ALTER DATABASE {admin.database} OWNER TO {role}')
        cur.execute(f'GRANT ALL ON SCHEMA public TO {role}')
    try:
        host = f'{admin.host or "127.0.0.1"}:{admin.port or 5432}/{admin.database}'
        enc = quote(PG_SECRET, safe='')

        def url(pw):
            return f'postgresql://{role}:{pw}@{host}' if shape == 'userinfo' else \
                f'postgresql://{role}@{host}?sslmode=prefer&password={pw}'
        out = tmp_path / 'runs'
        bindings = ['Data.vocab_size=300', 'D_MODEL=16', 'N_HEADS=2', 'autoencode/Stage.steps=1',
                    'Run.eval_batches=1', "Run.memory_store='none'"]
        assert rt_main(rt_argv('specs/autoencoder.gin', out, rt_cache, bindings, ['--db', url(enc)])) == 0
        streams = ''.join(capsys.readouterr())
        assert rt_main(rt_argv('specs/autoencoder.gin', tmp_path / 'wrong', rt_cache, bindings,
                               ['--db', url(quote('wrong-' + PG_SECRET, safe=''))])) == 2
        streams += ''.join(capsys.readouterr())
        (run_id,) = rt_run_ids(out)
        for main, args in ((runs.main, ['list', '--db', url(enc)]), (runs.main, ['show', run_id, '--db', url(enc)]),
                           (export.main, [run_id, str(tmp_path / 'export'), '--db', url(enc)])):
            code, o, e = in_process(main, args, capsys)
            assert code == 0, e
            streams += o + e
        forms = {PG_SECRET, enc, PIECE}
        assert not any(f in streams for f in forms), streams[-3000:]
        files = {**_texts(out), **_texts(tmp_path / 'export')}
        leaks = [str(p) for p, b in files.items() if any(f.encode() in b for f in forms)]
        assert not leaks, leaks
        with con.cursor() as cur:
            cur.execute(f'SET ROLE {role}')
            cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
            for (table,) in cur.fetchall():
                cur.execute(f'SELECT * FROM "{table}"')
                for row in cur.fetchall():
                    text = ' '.join(bytes(c).decode('latin-1') if isinstance(c, memoryview) else str(c) for c in row)
                    assert not any(f in text for f in forms), (table, text[:300])
            cur.execute('RESET ROLE')
    finally:
        with con.cursor() as cur:
            cur.execute('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s', (role,))
            cur.execute(f'ALTER DATABASE {admin.database} OWNER TO {admin.username}')
            cur.execute(f'REASSIGN OWNED BY {role} TO {admin.username}')
            cur.execute(f'DROP OWNED BY {role}')
            cur.execute(f'DROP ROLE {role}')
        con.close()
