"""Hardening, in process: what the fault suite (tests/faults.py, tests/test_faults.py) exercises through whole runs,
checked here at the level of the functions that own each rule: run names and references (store/layout.py), database
URLs in messages (store/database.py, runtime/record.py), stale RUNNING rows (store/runs.py), gin parse errors that
must not echo an included file, the verified data cache (runtime/data.py) and the memory store's versions and
owners (store/memories.py)."""
import datetime as dt
import json
import os
import re

import numpy as np
import pytest
import torch
import zarr
from conftest import FLAGSHIP, TINY_FLAGSHIP, rt_argv, rt_main

from compiler.errors import UserError

SECRET = 'pw-4f1c9e7d2b'


# ------------------------------------------------------------------------------------------------ run names

def test_run_names_and_references():
    from store.layout import RUN_KEY_HEX, check_reference, matching, new_run_key, parse_name, resolve, run_name
    key = new_run_key()
    assert re.fullmatch(f'[0-9a-f]{{{RUN_KEY_HEX}}}', key) and key != new_run_key()
    assert parse_name(run_name(3, key)) == ('3', key) and parse_name('3') == ('3', None)
    for bad in ('/tmp', '../..', '3/../..', '3-XYZ', '3-' + key + '/x', '', '.', 'runs/3', f'3-{key}0'):
        assert parse_name(bad) is None, bad
        with pytest.raises(UserError, match='is not a run id'):
            check_reference(bad, '--resume x')
    names = [f'0-{"a" * RUN_KEY_HEX}', f'0-{"b" * RUN_KEY_HEX}', f'1-{"c" * RUN_KEY_HEX}', '2', 'memories.zarr']
    assert matching(names, '1') == [names[2]] and matching(names, '2') == ['2'] and matching(names, '7') == []
    assert matching(names, names[1]) == [names[1]]
    with pytest.raises(UserError) as e:
        resolve(names, '0', 'RUN 0', 'under runs', 'or pass --db')
    assert e.value.what == (f'run id 0 is ambiguous: 2 runs with this id under runs ({names[0]}, {names[1]}; runs '
                            'recorded in different databases)')
    assert e.value.fix == f'give the full name, e.g. {names[0]}, or pass --db'


def test_resume_takes_a_run_id_never_a_path(tmp_path, rt_cache, capsys):
    out = tmp_path / 'runs'
    for ref in ('/tmp', '../..', f'{tmp_path}'):
        assert rt_main(rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP, ['--resume', ref])) == 2
        err = capsys.readouterr().err
        assert f"--resume {ref}: '{ref}' is not a run id" in err and 'paths are not accepted' in err, err
    assert not out.exists()


def test_no_stage_name_leaves_the_run_folder(tmp_path, rt_cache, capsys):
    from store.layout import RunFolder, check_stage_name
    for ok in ('blank_copy', 'stage_2', 'V1'):
        check_stage_name(ok, 'x')
    for bad in ('../../evil', '/etc/x', 'a/b', '..', '.hidden', '', 'x' * 200, 'v1.5', 'stage-2'):
        with pytest.raises(UserError, match='cannot be a file name'):
            RunFolder(tmp_path, '0', 'a' * 10).stage_weights(bad)
    out = tmp_path / 'runs'
    assert rt_main(rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP + ["blank/Stage.name = '../../evil'"])) == 2
    err = capsys.readouterr().err
    assert "blank/Stage.name = '../../evil'" in err and 'is not an identifier' in err, err  # the validator's refusal
    assert not out.exists() and not (tmp_path / 'evil.safetensors').exists()


# ------------------------------------------------------------------------------------------------ secrets

def test_database_urls_in_messages_never_show_the_password():
    from store.database import display_url, redact
    url = f'postgresql://alice:{SECRET}@db.example:5432/runs'
    assert display_url(url) == 'postgresql://alice:***@db.example:5432/runs'
    assert display_url(f'postgresql://alice:{SECRET}@host:notaport/x').count(SECRET) == 0  # unparsable: still hidden
    quoted = url.replace(SECRET, 'p%40ss')
    assert redact('FATAL: authentication for p@ss failed (p%40ss)', quoted) == \
        'FATAL: authentication for *** failed (***)'
    assert redact(f'connection to {url} refused', url) == 'connection to postgresql://alice:***@db.example:5432/runs ' \
                                                          'refused'


@pytest.mark.parametrize('url', [f'postgresql://alice:{SECRET}@127.0.0.1:1/x',  # nothing listens on port 1
                                 f'postgresql://alice:{SECRET}@127.0.0.1:notaport/x',  # SQLAlchemy quotes the URL
                                 f'mysql://alice:{SECRET}@127.0.0.1/x'])
def test_connection_errors_of_every_reader_and_writer_hide_the_password(url, capsys):
    from runtime import record
    from store import analyze, runs
    with pytest.raises(UserError) as e:
        record.observer(url)
    assert SECRET not in str(e.value) and 'alice:***@' in str(e.value), str(e.value)
    for main, argv in ((runs.main, ['list', '--db', url]), (analyze.main, ['info', '0', '--db', url])):
        with pytest.raises(SystemExit) as ex:
            main(argv)
        err = capsys.readouterr().err
        assert ex.value.code == 2 and SECRET not in err and 'Traceback' not in err, err


def test_an_included_non_spec_file_is_never_echoed(tmp_path):
    """gin quotes the token it cannot parse ("Failed to parse token 'AKIA...'"): the message names the file and line
    and the kind of problem, not the text."""
    from compiler.spec import load
    files = {'creds.txt': 'AWS_SECRET_ACCESS_KEY = wJalrXUtnFEMIK7MDENG\n',
             'credentials': '[default]\naws_secret_access_key = wJalrXUtnFEMIK7MDENG\n',
             'shadow': 'root:wJalrXUtnFEMIK7MDENG:19000:0:99999:7:::\n',
             'netrc': 'machine host login bob password wJalrXUtnFEMIK7MDENG\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        spec = tmp_path / f'{name}.gin'
        spec.write_text(f"include '{name}'\n")
        with pytest.raises(UserError) as e:
            load([str(spec)])
        assert 'wJalr' not in str(e.value) and 'malformed gin' in str(e.value), str(e.value)
        assert e.value.where.endswith(f'{name}:1'), e.value.where


def test_an_in_memory_database_is_refused(tmp_path):
    from runtime.record import check_lasting
    for url in ('sqlite://', 'sqlite:///:memory:', 'sqlite:///file::memory:?cache=shared'):
        with pytest.raises(UserError, match='an in-memory SQLite database ends with the process'):
            check_lasting(url)
    check_lasting(f'sqlite:///{tmp_path / "runs.db"}')  # a file lasts


# ------------------------------------------------------------------------------------------------ stale runs

def test_a_running_row_without_a_recent_heartbeat_is_flagged_stale():
    from store.database import STALE_AFTER, RunRecord
    from store.runs import status_text
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

    def run(status, beat, start=None):
        return RunRecord('3', status, start or now - dt.timedelta(hours=3), None, {}, {}, heartbeat=beat)
    assert status_text(run('RUNNING', now - dt.timedelta(hours=2, minutes=5))) == \
        'RUNNING (stale: no heartbeat for 2 h 05 min)'
    assert status_text(run('RUNNING', now - dt.timedelta(seconds=5))) == 'RUNNING'
    assert status_text(run('RUNNING', None, now - STALE_AFTER * 3)).startswith('RUNNING (stale: ')  # never beat
    assert status_text(run('COMPLETED', now - dt.timedelta(days=9))) == 'COMPLETED'


# ------------------------------------------------------------------------------------------------ data cache

@pytest.mark.parametrize('damage', ['truncate train.tokens', 'garbage meta.json', 'garbage tokenizer.json',
                                    'delete tokenizer.json'])
def test_a_damaged_data_cache_is_rebuilt_identical_with_one_note(tmp_path, damage, capsys):
    from compiler.spec import load
    from runtime.data import prepare
    plan = load([FLAGSHIP], ['Data.vocab_size=300', 'Data.max_documents=40', f"Data.cache_dir='{tmp_path}'"]).plan
    first = prepare(plan, progress=False)
    before = first.train, first.val_mask  # read now: the token files are memory maps, and the damage is in place
    how, file = damage.split(' ')
    target = first.cache_path / file
    if how == 'truncate':
        os.truncate(target, target.stat().st_size // 2)
    elif how == 'garbage':
        target.write_bytes(b'\x00{not json')
    else:
        target.unlink()
    capsys.readouterr()
    again = prepare(plan, progress=False)
    err = capsys.readouterr().err
    assert err.count('is damaged') == 1 and 'rebuilding it' in err and file in err, err
    assert again.cache_path == first.cache_path and not again.cache_hit
    assert torch.equal(again.train, before[0]) and torch.equal(again.val_mask, before[1])
    assert again.tokenizer.to_str() == first.tokenizer.to_str()
    assert prepare(plan, progress=False).cache_hit and 'damaged' not in capsys.readouterr().err


def test_an_unwritable_cache_folder_is_refused_naming_the_setting(tmp_path):
    from compiler.spec import load
    from runtime.data import prepare
    blocker = tmp_path / 'a-file'
    blocker.write_text('x')
    plan = load([FLAGSHIP], ['Data.vocab_size=300', 'Data.max_documents=40', f"Data.cache_dir='{blocker}'"]).plan
    with pytest.raises(UserError) as e:
        prepare(plan, progress=False)
    assert e.value.where.startswith('Data.cache_dir') and 'cannot write the data cache' in e.value.what
    assert blocker.read_text() == 'x'


# ------------------------------------------------------------------------------------------------ memory store

def test_version_1_stores_are_still_read_and_their_missing_chunks_found(tmp_path):
    """A store written before checksums (format version 1: zero fill, chunks of zeros skipped) reads as before; a
    missing memories chunk is reported instead of reading as zeros."""
    from store import memories as M
    store = tmp_path / 'v1.zarr'
    g = zarr.open_group(str(store), mode='a').require_group('0/s')
    rows, mem = 300, np.random.default_rng(0).standard_normal((300, 2, 4)).astype(np.float32)
    for name, a in (('memories', mem), ('tokens', np.full((rows, 2, 3), 5, np.int32)),
                    ('mask', np.ones((rows, 2, 3), bool))):
        g.create_array(name, shape=a.shape, chunks=(M.ROWS, *a.shape[1:]), dtype=a.dtype)[:] = a
    g.attrs.update({'format': M.FORMAT, 'version': 1, 'run_id': '0', 'stage': 's', 'dtype': 'float32',
                    'rows': rows, 'complete': True})
    got, _, _ = M.open_group(store, '0', 's').rows(0, rows)
    assert torch.equal(got, torch.from_numpy(mem))
    (store / '0' / 's' / 'memories' / 'c' / '1' / '0' / '0').unlink()
    with pytest.raises(UserError, match=r'stage s: the stored memories are damaged: rows 256-299 cannot be read: '
                                        r'chunks are missing \(memories: rows 256-299\)'):
        M.open_group(store, '0', 's')


def test_chunks_carry_checksums_and_fill_values_real_data_never_has(tmp_path):
    from store import memories as M
    w = M.Writer(tmp_path / 's.zarr', '0-aaaaaaaaaa', 's', {'run_key': 'aaaaaaaaaa'}, (300, 2, 3, 4))
    w.append(torch.zeros(300, 2, 4), torch.zeros(300, 2, 3, dtype=torch.long), torch.zeros(300, 2, 3, dtype=bool))
    w.close()
    g = zarr.open_group(str(tmp_path / 's.zarr'), mode='r')['0-aaaaaaaaaa/s']
    for name, fill in (('memories', 'NaN'), ('tokens', -1), ('mask', False)):
        meta = json.loads((tmp_path / 's.zarr' / '0-aaaaaaaaaa' / 's' / name / 'zarr.json').read_text())
        assert [c['name'] for c in meta['codecs']] == ['bytes', 'zstd', 'crc32c'] and meta['fill_value'] == fill
        assert g[name].nchunks_initialized == 2  # all-zero and all-False chunks are written too
    assert g.attrs['version'] == M.FORMAT_VERSION == 3 and g.attrs['rows'] == 300


def test_a_writer_never_replaces_another_runs_group(tmp_path):
    from store import memories as M
    shape = (4, 1, 2, 3)
    M.Writer(tmp_path / 's.zarr', '0-aaaaaaaaaa', 's', {'run_key': 'aaaaaaaaaa'}, shape)
    with pytest.raises(UserError, match='the group belongs to another run .run key aaaaaaaaaa, this run bbbbbbbbbb'):
        M.Writer(tmp_path / 's.zarr', '0-aaaaaaaaaa', 's', {'run_key': 'bbbbbbbbbb'}, shape)
    M.Writer(tmp_path / 's.zarr', '0-aaaaaaaaaa', 's', {'run_key': 'aaaaaaaaaa'}, shape)  # its own run: a rewrite


# ------------------------------------------------------------------------------------------------ the run lock

def _record(beat_ago):
    from store.database import RunRecord
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return RunRecord('3', 'RUNNING', now - dt.timedelta(hours=3), None, {}, {'run_key': 'a' * 10},
                     heartbeat=now - beat_ago)


def test_the_run_lock_is_exclusive_while_held_and_free_once_released(tmp_path):
    import socket

    from runtime.lock import RunBusy, RunLock
    first = RunLock(tmp_path / 'run.lock').acquire()
    with pytest.raises(RunBusy) as e:
        RunLock(tmp_path / 'run.lock').acquire()
    assert e.value.holder['pid'] == os.getpid() and e.value.holder['host'] == socket.gethostname()
    first.release()
    RunLock(tmp_path / 'run.lock').acquire().release()


def test_a_holder_on_another_host_with_a_fresh_heartbeat_counts_as_alive(tmp_path):
    """flock does not reach across hosts on some network filesystems: the lock file names the last holder's host,
    and a fresh heartbeat from another host refuses the resume until it is stale."""
    from runtime.run import take_lock
    from store.database import STALE_AFTER
    from store.layout import RunFolder
    folder = RunFolder(tmp_path, '3', 'a' * 10)
    folder.root.mkdir()
    folder.lock.write_text(json.dumps({'pid': 4242, 'host': 'elsewhere', 'since': 'then'}))
    with pytest.raises(UserError) as e:
        take_lock(folder, _record(dt.timedelta(seconds=5)), '--resume 3')
    assert 'may still be running on host elsewhere (pid 4242)' in e.value.what and 'stale' in e.value.fix
    assert json.loads(folder.lock.read_text())['host'] == 'elsewhere'  # the holder's note is not overwritten
    take_lock(folder, _record(STALE_AFTER * 2), '--resume 3').release()  # stale: taken over


def test_a_filesystem_without_locks_falls_back_to_the_heartbeat(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    from runtime.run import take_lock
    from store.database import STALE_AFTER
    from store.layout import RunFolder

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, 'flock', no_locks)
    folder = RunFolder(tmp_path, '3', 'a' * 10)
    with pytest.raises(UserError, match='cannot lock files'):
        take_lock(folder, _record(dt.timedelta(seconds=5)), '--resume 3')
    assert take_lock(folder, _record(STALE_AFTER * 2), '--resume 3') is None
    assert 'without file locks' in capsys.readouterr().err


def test_bad_input_outside_a_spec_is_a_user_error_and_spec_problems_stay_spec_errors(capsys):
    """UserError is what every CLI turns into one message and exit 2; SpecError, its subclass, is kept for problems
    in a spec. A database URL is not a spec."""
    from compiler.errors import SpecError, cli
    from compiler.spec import load
    from store.database import open_db
    with pytest.raises(UserError) as e:
        open_db('runs/sacred.db')
    assert type(e.value) is UserError and e.value.where == '--db runs/sacred.db'
    assert e.value.fix == 'write sqlite:///runs/sacred.db'
    with pytest.raises(SpecError) as e:
        load(['specs/autoencoder.gin'], ['Memory.chunk_len = -1'])
    assert isinstance(e.value, UserError) and "binding -b 'Memory.chunk_len = -1'" in e.value.where

    @cli
    def main():
        open_db('runs/sacred.db')

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ('error: --db runs/sacred.db: not a database URL\n'
                                       '  fix: write sqlite:///runs/sacred.db\n')
