"""Files memspec's store commands write for the user (store/files.py): exports and plots get the permissions the
umask gives, a full or read-only disk is one message with nothing half-written, and an export carries the source
diff's hash, not the diff, unless asked (store/export.py)."""
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, in_process
from test_untrusted import _read_only, copy_db

from store import export as E
from store import runs as R

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def modes(folder) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob('*') if p.is_file()}


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_every_exported_file_has_the_umasks_mode(umask, stored_run, tmp_path, capsys):
    old = os.umask(umask)
    try:
        code, _, err = in_process(E.main, [stored_run.run_id, tmp_path / 'out', '--db', stored_run.url], capsys)
    finally:
        os.umask(old)
    assert code == 0, err
    got = modes(tmp_path / 'out')
    assert 'hf/model.safetensors' in got and 'model.safetensors' in got  # safetensors itself creates 0600 files
    assert set(got.values()) == {0o666 & ~umask}, got


INJECTED = {  # where a full disk hits an export
    'copying the weights': ('shutil.copyfile', lambda *a, **k: (_ for _ in ()).throw(ENOSPC)),
    'writing config.json': ('pathlib.Path.write_text', lambda *a, **k: (_ for _ in ()).throw(ENOSPC)),
    'the Hugging Face weights': ('safetensors.torch.save_file', None),
    'renaming into place': ('os.replace', lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, 'x'))),
}


@pytest.mark.parametrize('where', list(INJECTED))
def test_a_full_disk_during_an_export_is_one_message_and_leaves_nothing(where, stored_run, tmp_path, monkeypatch,
                                                                         capsys):
    import importlib
    target, fake = INJECTED[where]
    if fake is None:  # safetensors reports a full disk as its own error type, with the OS text
        from safetensors import SafetensorError

        def fake(*a, **k):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
    module, _, name = target.rpartition('.')
    if module == 'pathlib.Path':
        import pathlib
        owner = pathlib.Path
    else:
        owner = importlib.import_module(module)
    monkeypatch.setattr(owner, name, fake)
    out = tmp_path / 'out'
    code, stdout, err = in_process(E.main, [stored_run.run_id, out, '--db', stored_run.url], capsys)
    monkeypatch.undo()
    assert code == 2 and 'Traceback' not in err and err.startswith('error: OUT '), err
    assert len(err.strip().splitlines()) == 2, err
    assert ('No space left on device' in err or 'Read-only file system' in err) and 'nothing was exported' in err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # no OUT, no temporary folder


def _in_read_only_folder(tmp_path, argv) -> tuple[subprocess.CompletedProcess, Path]:
    """`python -m ARGV` (argv may name '{ro}', a read-only folder) with the folder made read-only; -> (process,
    folder). Skips where no folder can be made read-only (root without unshare)."""
    folder = tmp_path / 'ro'
    folder.mkdir()
    prefix = _read_only(folder)
    if prefix is None:
        pytest.skip('no way to make a read-only folder here (root without unshare)')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        argv = [str(a).replace('{ro}', str(folder)) for a in argv]
        p = subprocess.run([*prefix, sys.executable, '-m', *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    finally:
        folder.chmod(0o755)
    return p, folder


def test_an_export_into_a_read_only_folder_is_one_message(stored_run, tmp_path):
    p, folder = _in_read_only_folder(tmp_path, ['store.export', stored_run.run_id, '{ro}/out', '--db', stored_run.url])
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr
    assert ('Read-only file system' in p.stderr or 'Permission denied' in p.stderr) and 'nothing was exported' \
        in p.stderr, p.stderr
    assert list(folder.iterdir()) == []


def test_a_plot_on_a_full_disk_is_one_message_and_leaves_nothing(stored_run, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def full(self, fname, *a, **k):
        with open(fname, 'wb') as f:
            f.write(b'half a png')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Figure, 'savefig', full)
    png = tmp_path / 'curves.png'
    code, _, err = in_process(R.main, ['metrics', stored_run.run_id, '--plot', png, '--db', stored_run.url], capsys)
    assert code == 2 and 'Traceback' not in err and f'--plot {png}' in err and 'No space left on device' in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_plot_into_a_read_only_folder_is_one_message(stored_run, tmp_path):
    p, folder = _in_read_only_folder(tmp_path, ['store.runs', 'metrics', stored_run.run_id, '--plot', '{ro}/x.png',
                                                '--db', stored_run.url])
    assert p.returncode == 2 and 'Traceback' not in p.stderr and 'no plot was written' in p.stderr, p.stderr
    assert list(folder.iterdir()) == []


# ------------------------------------------------------------------------------------------------ the source diff

DIFF = 'diff --git a/compiler/x.py b/compiler/x.py\n+API_KEY = "sk-live-0123456789"\n'


@pytest.fixture
def dirty_db(stored_run, tmp_path):
    """A copy of the stored run's database whose run recorded a dirty tree with a secret in its diff."""
    db = tmp_path / 'sacred.db'
    copy_db(stored_run.db, db)
    code = {'kind': 'git', 'commit': 'a' * 40, 'branch': 'main', 'dirty': True, 'diff': DIFF,
            'diff_sha256': hashlib.sha256(DIFF.encode()).hexdigest(), 'diff_bytes': len(DIFF.encode()),
            'untracked': [], 'untracked_more': 0}
    con = sqlite3.connect(db)
    con.execute("UPDATE run SET config = json_set(config, '$.provenance.code', json(?))", (json.dumps(code),))
    con.commit()
    con.close()
    return f'sqlite:///{db}'


def test_an_export_records_the_diffs_hash_not_the_diff(dirty_db, stored_run, tmp_path, capsys):
    out = tmp_path / 'out'
    code, _, err = in_process(E.main, [stored_run.run_id, out, '--db', dirty_db], capsys)
    assert code == 0, err
    assert not any(b'sk-live' in p.read_bytes() for p in out.rglob('*') if p.is_file())
    cfg = json.loads((out / 'config.json').read_text())
    got = cfg['provenance']['code']
    assert 'diff' not in got and got['diff_sha256'] == hashlib.sha256(DIFF.encode()).hexdigest()
    assert got['diff_bytes'] == len(DIFF) and cfg['source_diff'] is None and not (out / 'source.diff').exists()
    assert f'dirty: {len(DIFF)} bytes of diff' in (out / 'README.md').read_text()


def test_include_diff_writes_it_beside_the_export(dirty_db, stored_run, tmp_path, capsys):
    out = tmp_path / 'out'
    code, _, err = in_process(E.main, [stored_run.run_id, out, '--db', dirty_db, '--include-diff'], capsys)
    assert code == 0, err
    kept = stored_run.run_dir / 'source.diff'  # the run folder's copy wins over the recorded one
    assert (out / 'source.diff').read_text() == (kept.read_text() if kept.is_file() else DIFF)
    assert json.loads((out / 'config.json').read_text())['source_diff'] == 'source.diff'


# ------------------------------------------------------------------------------------------------ provenance

def test_untracked_files_are_listed_not_a_dirty_tree(tmp_path):
    from runtime import provenance
    repo = tmp_path / 'repo'
    shutil.copytree(ROOT / 'specs', repo / 'specs')
    (repo / '.gitignore').write_text('scratch/\n*.log\n')
    env = ['-c', 'user.email=t@t', '-c', 'user.name=t']
    subprocess.run(['git', 'init', '-q', str(repo)], check=True, timeout=600)
    subprocess.run(['git', '-C', str(repo), *env, 'add', '-A'], check=True, timeout=600)
    subprocess.run(['git', '-C', str(repo), *env, 'commit', '-qm', 'x'], check=True, timeout=600)
    (repo / 'scratch').mkdir()
    (repo / 'scratch' / 'notes.txt').write_text('ignored')
    (repo / 'run.log').write_text('ignored')
    (repo / 'todo.md').write_text('listed')
    state, diff = provenance.source_state(repo)
    assert diff == '' and state['dirty'] is False and state['diff_bytes'] == 0
    assert state['untracked'] == [{'path': 'todo.md', 'sha256': hashlib.sha256(b'listed').hexdigest()}]
    assert R.code_line(state).endswith(', clean, untracked files hashed: todo.md'), R.code_line(state)
    (repo / 'specs' / 'clm.gin').write_text('# changed\n')
    state, diff = provenance.source_state(repo)
    assert state['dirty'] and '+# changed' in diff
    assert f"dirty: {state['diff_bytes']:,} bytes of diff" in R.code_line(state)
