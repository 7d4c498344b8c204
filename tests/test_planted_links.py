"""Files memspec creates or replaces in a run folder or a memory store are never written through a symbolic link
someone else planted there: the write is refused with one message (exit 2 from the CLI) and the link's target keeps
its bytes. A COMPLETED run is not resumed (it would be trained again under the same record)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import PROBE, TINY_PROBE, db_rows, rt_argv, rt_main, rt_run_dir

from compiler.errors import UserError

SECRET = b'the bytes of a file the run must not touch\n'


def plant(path, tmp_path, name='target'):
    """A symbolic link at `path` to a file (or, for `dir`, a folder) outside; -> the target."""
    target = tmp_path / name
    target.write_bytes(SECRET)
    if path.exists() or path.is_symlink():
        os.replace(path, path.with_name(path.name + '.aside'))
    path.symlink_to(target)
    return target


def unplant(path):
    path.unlink()
    aside = path.with_name(path.name + '.aside')
    if aside.exists():
        os.replace(aside, path)


# ------------------------------------------------------------------------------------------------ the primitives

def test_the_run_lock_refuses_a_symbolic_link_and_a_hard_link(tmp_path):
    from runtime.lock import RunLock
    lock = tmp_path / 'run' / 'run.lock'
    lock.parent.mkdir()
    target = plant(lock, tmp_path)
    with pytest.raises(UserError) as e:
        RunLock(lock).acquire()
    assert e.value.where == str(lock) and 'symbolic link' in e.value.what and 'remove the link' in e.value.fix
    assert target.read_bytes() == SECRET
    lock.unlink()
    os.link(target, lock)
    with pytest.raises(UserError) as e:
        RunLock(lock).acquire()
    assert 'hard link' in e.value.what
    assert target.read_bytes() == SECRET
    lock.unlink()
    RunLock(lock).acquire().release()  # a plain lock file is taken as before


@pytest.mark.parametrize('where', ['file', 'folder'])
def test_atomic_writes_refuse_a_link_at_the_file_or_as_its_folder(tmp_path, where):
    import runtime.checkpoint as R
    from store.files import write_text
    run = tmp_path / 'run'
    (run / 'stages').mkdir(parents=True)
    if where == 'file':
        targets = [plant(run / n, tmp_path, n) for n in ('summary.md', 'checkpoint.pt', 'checkpoint.pt.sha256')]
    else:
        os.rmdir(run / 'stages')
        outside = tmp_path / 'outside'
        outside.mkdir()
        (run / 'stages').symlink_to(outside)
        targets = []
    with pytest.raises(UserError, match='symbolic link'):
        write_text(run / ('summary.md' if where == 'file' else 'stages/a.safetensors'), 'x')
    if where == 'file':
        with pytest.raises(UserError, match='symbolic link'):
            R.save_checkpoint(run / 'checkpoint.pt', {'step': torch.tensor(1)})
        assert all(t.read_bytes() == SECRET for t in targets)
    else:
        assert list(outside.iterdir()) == []
    assert [p.name for p in run.rglob('.*')] == []  # no temporary left behind


def test_the_tensorboard_folder_is_not_a_planted_link(tmp_path):
    from runtime.tracking import Tracker
    outside = tmp_path / 'outside'
    outside.mkdir()
    (tmp_path / 'tensorboard').symlink_to(outside)
    with pytest.raises(UserError, match='symbolic link'):
        Tracker(None, tmp_path / 'tensorboard')
    assert list(outside.iterdir()) == []


def test_a_memory_store_metadata_file_is_not_written_through_a_link(tmp_path):
    from store import memories
    store = tmp_path / 'memories.zarr'
    store.mkdir()
    target = plant(store / 'zarr.json', tmp_path)
    target.write_text(json.dumps({'zarr_format': 3, 'node_type': 'group', 'attributes': {}}))
    before = target.read_bytes()
    with pytest.raises(UserError, match='symbolic link'):
        memories.consolidate(store)
    assert target.read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == ['zarr.json']


def test_a_memory_group_is_not_written_through_a_planted_link(tmp_path):
    from store import memories
    store, outside = tmp_path / 'memories.zarr', tmp_path / 'outside'
    outside.mkdir()
    memories.Writer(store, '0-aaaaaaaaaa', 'autoencode', {}, (2, 1, 4, 8))  # a store with one group
    (store / '1-bbbbbbbbbb').symlink_to(outside)
    with pytest.raises(UserError, match='symbolic link'):
        memories.Writer(store, '1-bbbbbbbbbb', 'autoencode', {}, (2, 1, 4, 8))
    assert list(outside.iterdir()) == []


# ------------------------------------------------------------------------------------------------ --resume

@pytest.fixture(scope='module')
def probe_run(tmp_path_factory, rt_cache):
    out = tmp_path_factory.mktemp('planted')
    argv = rt_argv(PROBE, out, rt_cache, TINY_PROBE)
    assert rt_main(argv) == 0
    (run_id,) = {p.name.split('-')[0] for p in out.iterdir() if p.is_dir() and p.name[0].isdigit()}
    return argv, out, run_id, rt_run_dir(out, run_id)


def test_resuming_a_completed_run_is_refused(probe_run, capsys):
    argv, out, run_id, folder = probe_run
    before = {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()}
    assert rt_main(argv + ['--resume', run_id]) == 2
    err = capsys.readouterr().err
    assert f'--resume {run_id}: run {folder.name} already COMPLETED: there is nothing to resume' in err, err
    assert f'python -m store.runs show {run_id}' in err and 'drop --resume' in err
    assert 'Traceback' not in err and err.count('error:') == 1
    assert {p: p.stat().st_mtime_ns for p in folder.rglob('*') if p.is_file()} == before
    assert db_rows(out / 'sacred.db', 'SELECT status FROM run') == [('COMPLETED',)]


@pytest.mark.parametrize('name', ['run.lock', 'checkpoint.pt.sha256', 'final.safetensors', 'run.json', 'summary.md',
                                  'summary.json', 'operative.gin', 'tokenizer.json', 'tensorboard', 'stages',
                                  'stages/probe.safetensors'])
def test_resume_refuses_a_link_planted_in_the_run_folder(probe_run, tmp_path, capsys, name):
    """The run stopped (INTERRUPTED); someone replaced one of its files (or folders) by a link: --resume refuses it
    before it locks, records or writes anything, and the link's target keeps its bytes."""
    argv, out, run_id, folder = probe_run
    db = out / 'sacred.db'
    import sqlite3
    con = sqlite3.connect(db)
    con.execute("UPDATE run SET status = 'INTERRUPTED'")
    con.commit()
    path = folder / name
    target = plant(path, tmp_path)
    try:
        code = rt_main(argv + ['--resume', run_id])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f'error: {path}: is a symbolic link (to {target}), which memspec never makes' in err, err
        assert 'Traceback' not in err and err.count('error:') == 1
        assert target.read_bytes() == SECRET
        assert db_rows(db, 'SELECT status FROM run') == [('INTERRUPTED',)]
    finally:
        unplant(path)
        con.execute("UPDATE run SET status = 'COMPLETED'")
        con.commit()
        con.close()
