"""Faults: kill -9 at seeded random moments of a run, then --resume; disk full while checkpointing or writing
memories (simulated, and on a real full tmpfs); an unwritable output folder; a run database unreachable at start or
gone mid-run; a corrupted checkpoint; a crafted checkpoint that must not run code; SIGTERM; a resume of a live run;
two databases sharing an out_dir; damaged memory stores and data caches; refusals before work; the database password
in no output, file or row.

The matrix runs as one bounded tests/faults.py subprocess (10 kill points and every resource fault,
two scenarios side by side, each run a fork of a warmed-up process so it takes ~1 s); the tests below read its
JSON report. MEMSPEC_FAULT_SEED picks other kill points (default 0); the suite prints the seed and every failing
point's hooks, so a failure reproduces with `python tests/faults.py --seed S --kills 10`.
A few properties of the checkpoint format are also tested directly, in process."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from compiler.errors import UserError

SEED = int(os.environ.get('MEMSPEC_FAULT_SEED', '0'))
KILLS = 10
PG_DEFAULT = 'postgresql://memspec:memspec@localhost:5432/postgres'


def postgres_admin() -> tuple[str | None, str]:
    """(admin URL or None, why not). MEMSPEC_TEST_POSTGRES set but unreachable is an error, not a skip."""
    env = os.environ.get('MEMSPEC_TEST_POSTGRES')
    try:
        import psycopg2
        psycopg2.connect(env or PG_DEFAULT, connect_timeout=5).close()
        return env or PG_DEFAULT, ''
    except Exception as e:  # noqa: BLE001
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if env:
            pytest.fail(f'MEMSPEC_TEST_POSTGRES={env} is set but the server is unreachable: {reason}')
        return None, f'no PostgreSQL: MEMSPEC_TEST_POSTGRES is unset and {PG_DEFAULT} is unreachable ({reason})'


@pytest.fixture(scope='module')
def report(tmp_path_factory, rt_cache):
    root = tmp_path_factory.mktemp('reliability')
    pg, why = postgres_admin()
    out = root / 'reliability.json'
    cmd = [sys.executable, str(ROOT / 'tests' / 'faults.py'), '--kills', str(KILLS), '--seed', str(SEED),
           '--jobs', '2', '--root', str(root / 'work'), '--cache', str(rt_cache), '--json', str(out),
           '--postgres', pg or 'none']
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1')
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.is_file(), f'the suite wrote no report (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    rep = json.loads(out.read_text())
    rep['_stdout'], rep['_exit'], rep['_pg_why'] = r.stdout, r.returncode, why
    rep['_by_id'] = {p['id']: p for p in rep['points']}
    return rep


def explain(p: dict) -> str:
    return f"{p['id']} (seed {SEED}, hooks {p.get('hooks')}):\n  " + '\n  '.join(p.get('problems') or ['?'])


def fault(report, name):
    p = report['_by_id'].get(name)
    assert p is not None, f'scenario {name} did not run'
    assert p['survived'], explain(p)
    assert not sum(p.get('lost', {}).values()) and not sum(p.get('duplicated', {}).values()), explain(p)
    return p


# ------------------------------------------------------------------------------------------------- kill -9

def test_kill_points_resume_to_the_uninterrupted_result(report):
    kills = [p for p in report['points'] if p['kind'] == 'kill']
    assert len(kills) == KILLS
    injected = sum(p['killed'] for p in kills)
    assert injected >= KILLS, \
        f'only {injected} kills landed: ' + ', '.join(f"{p['id']}: {p.get('note')}" for p in kills if not p['killed'])
    failed = [explain(p) for p in kills if not p['survived']]
    assert not failed, '\n'.join(failed)


def test_kill_points_cover_steps_checkpoints_zarr_appends_and_database_writes(report):
    hit = {p['category'] for p in report['points'] if p['kind'] == 'kill' and p['killed']}
    assert hit == {'mid-step', 'checkpoint write', 'zarr append', 'database write'}, hit


def test_no_record_is_lost_or_duplicated(report):
    s = report['summary']
    assert s['records_lost'] == 0 and s['records_duplicated'] == 0, \
        '\n'.join(explain(p) for p in report['points'] if p.get('lost') or p.get('duplicated'))
    assert report['_exit'] == 0, report['_stdout'][-3000:]


def test_suite_prints_the_summary_table_and_writes_json(report):
    out = report['_stdout']
    for needle in ('faults injected', 'runs survived', 'records lost', 'kill -9: checkpoint write',
                   'disk_full_checkpoint'):
        assert needle in out, out[-2000:]
    s = report['summary']
    assert (s['faults_injected'] >= KILLS + 8
            and s['runs_survived'] == s['runs'] == s['scenarios'] - len(s['not_reached']) - len(s['skipped']))
    assert report['seed'] == SEED and report['baseline']['counts']['zarr_append'] >= 2


def test_a_kill_while_a_resumed_run_replaces_a_half_written_memory_group_is_survived(report):
    """Killed mid-append, then killed again while the resume deletes that group (its metadata and half its files
    gone): the arrays left behind must not stop the next resume from writing the group afresh."""
    fault(report, 'kill_while_replacing_memories')


# ------------------------------------------------------------------------------------------------- resource faults

def test_disk_full_while_checkpointing_stops_cleanly_keeping_the_previous_checkpoint(report):
    p = fault(report, 'disk_full_checkpoint')
    assert 'No space left on device' in p['message'] and 'checkpoint.pt' in p['message'], p['message']
    assert '--resume' in p['message']
    assert p['checkpoint_left'] == {'stage': 1, 'step': 0}, p['checkpoint_left']  # the stage boundary before it


def test_disk_full_while_writing_memories_leaves_a_refused_group_that_resume_rewrites(report):
    p = fault(report, 'disk_full_memories')
    assert 'No space left on device' in p['message'] and 'memories' in p['message'], p['message']
    assert p['checkpoint_left'] == {'stage': 0, 'step': 2}, p['checkpoint_left']


def test_unwritable_output_folder_exits_2_before_anything_is_written(report):
    p = fault(report, 'unwritable_out_dir')
    assert 'Run.out_dir' in p['message'] and 'fix:' in p['message'], p['message']


def test_database_unreachable_at_start_exits_2_and_writes_nothing(report):
    fault(report, 'db_unreachable_at_start')


def test_database_gone_mid_run_stops_before_the_next_checkpoint_and_resume_records_everything(report):
    p = fault(report, 'db_gone_midrun')
    assert 'stopped answering' in p['message'] and '--resume' in p['message'], p['message']


def test_database_gone_after_the_last_checkpoint_is_reported_and_resume_records_the_rest(report):
    p = fault(report, 'db_gone_at_the_end')
    assert 'finished' in p['message'] and 'not recorded' in p['message'] and '--resume' in p['message'], p['message']


def test_postgresql_gone_mid_run_stops_cleanly_and_resume_records_everything(report):
    if report['_pg_why']:
        pytest.skip(report['_pg_why'])
    p = fault(report, 'postgres_gone_midrun')
    assert 'not currently accepting connections' in p['message'] or 'stopped answering' in p['message'], p['message']


def test_corrupted_checkpoint_is_refused_and_the_named_fix_restarts_the_run(report):
    p = fault(report, 'corrupt_checkpoint')
    assert 'damaged' in p['message'] and 'checkpoint.pt.sha256' in p['message'] and 'fix:' in p['message'], p['message']


# ------------------------------------------------------------------------------------------------- hardening

def ran(report, name):
    """The scenario's result, passing (or skipped with the reason the suite gave: no mount, no PostgreSQL)."""
    p = report['_by_id'].get(name)
    if p is None and name == 'password_never_shown' and report['_pg_why']:
        pytest.skip(report['_pg_why'])
    assert p is not None, f'scenario {name} did not run'
    if p.get('skipped'):
        pytest.skip(p['skipped'])
    return fault(report, name)


@pytest.mark.parametrize('name,file', [('disk_full_real_checkpoint', 'checkpoint.pt'),
                                       ('disk_full_real_memories', 'memories.zarr/0-'),
                                       ('disk_full_real_final_weights', 'final.safetensors')])
def test_a_real_full_disk_ends_the_run_failed_naming_the_disk_and_resume_completes(report, name, file):
    """A tmpfs filled to the last byte (torch.save then raises RuntimeError 'unexpected pos', safetensors its own
    error, zarr OSError): one message naming the file, the disk and its free space, exit 1, FAILED, the last
    checkpoint intact; resumed after space is freed, the run equals the uninterrupted one."""
    p = ran(report, name)
    m = p['message']
    assert m.startswith('error: cannot write ') and file in m and 'No space left on device' in m, m
    assert 'on the filesystem at ' in m and f'{name}-disk (0 B free of 32.0 MiB)' in m, m
    assert 'recorded as FAILED' in m and '--resume 0' in m, m


@pytest.mark.parametrize('name', ['sigterm_mid_step', 'sigterm_in_evaluation', 'sigterm_in_memory_write',
                                  'sigterm_in_checkpoint_write'])
def test_sigterm_interrupts_like_ctrl_c_with_a_resume_point(report, name):
    p = ran(report, name)
    assert p['message'] == 'interrupted (SIGTERM): the run is recorded as INTERRUPTED; continue it with --resume 0', \
        p['message']


def test_resume_of_a_live_run_is_refused_and_a_dead_one_is_flagged_stale_and_taken_over(report):
    p = ran(report, 'resume_while_alive')
    assert 'is being trained by a live process: pid ' in p['message'] and 'run.lock' in p['message'], p['message']
    assert 'the lock of a process that died is free' in p['message'], p['message']
    assert p['listed'] and 'RUNNING (stale: no heartbeat for 2 h' in p['listed'][0], p['listed']


def test_a_crafted_checkpoint_is_refused_without_running_its_payload(report):
    p = ran(report, 'crafted_checkpoint')
    assert 'holds objects other than tensors and plain values' in p['message'] and 'not loaded' in p['message']


def test_two_databases_sharing_an_out_dir_and_a_store_never_mix_their_runs(report):
    p = ran(report, 'shared_out_dir')
    assert len(set(p['names'].values())) == 3, p['names']
    assert 'run id 0 is ambiguous: 3 runs' in p['message'] and 'fix: give the full name' in p['message'], p['message']


def test_missing_and_corrupt_memory_chunks_are_reported_with_their_rows(report):
    p = ran(report, 'damaged_memories')
    m = p['messages']
    assert 'stage autoencode: the stored memories are damaged: rows 256-506 cannot be read: chunks are missing' \
        in m['missing chunk'], m
    assert 'rows 0-255 cannot be read: a chunk is corrupt (its crc32c checksum does not match)' in m['corrupt chunk']
    assert "zarr.json of stage 'blank_copy' is unreadable" in m['garbled group metadata'], m


def test_a_damaged_data_cache_is_rebuilt_with_one_note(report):
    p = ran(report, 'damaged_cache')
    notes = p['notes']
    assert 'train.tokens does not match the sha256 in meta.json' in notes['truncated train.tokens'], notes
    assert 'meta.json unreadable' in notes['garbage meta.json'], notes
    assert 'tokenizer.json does not match the sha256' in notes['garbage tokenizer.json'], notes


def test_bad_outputs_and_inputs_are_refused_before_any_work(report):
    p = ran(report, 'refused_before_work')
    m = p['messages']
    assert 'an in-memory SQLite database ends with the process' in m['memory db'], m
    assert 'an in-memory SQLite database ends with the process' in m['memory db file'], m
    assert 'the memory store is damaged' in m['garbled store'], m
    assert 'cannot read the weights' in m['truncated weights to generate'], m
    assert 'cannot read' in m['truncated init_from source'] and 'incomplete metadata' in \
        m['truncated init_from source'], m
    if 'read-only store' in m:
        assert 'Read-only file system' in m['read-only store'], m


def test_the_database_password_appears_in_no_output_file_or_row(report):
    p = ran(report, 'password_never_shown')
    c = p['checked']
    assert c['logs'] >= 10 and c['files'] > 10 and c['tables'] >= 5 and c['rows'] > 20, c


# ------------------------------------------------------------------------------------------------- in process

def test_atomic_write_leaves_the_old_file_when_the_disk_is_full(tmp_path):
    from store.files import atomic_write
    target = tmp_path / 'checkpoint.pt'
    target.write_bytes(b'old')

    def full(tmp):
        Path(tmp).write_bytes(b'half of the new')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    with pytest.raises(OSError) as e:
        atomic_write(target, full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)  # names the file, not the temporary
    assert target.read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt']


def test_a_kill_between_the_digest_and_the_checkpoint_rename_still_verifies(tmp_path, monkeypatch):
    """save_checkpoint replaces checkpoint.pt.sha256 first; killed before checkpoint.pt is renamed, the old checkpoint
    must still load (its digest is kept as the previous one)."""
    import runtime.checkpoint as R
    path = tmp_path / 'checkpoint.pt'
    R.save_checkpoint(path, state(1))
    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt('killed before the rename')  # stands in for SIGKILL at this instant
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt):
        R.save_checkpoint(path, state(2))
    monkeypatch.setattr(os, 'replace', real_replace)
    R._digests.clear()
    assert R.load_checkpoint(path, '--resume x', 'x')['step'] == 1
    R.save_checkpoint(path, state(3))  # and the next write proceeds normally
    R._digests.clear()
    assert R.load_checkpoint(path, '--resume x', 'x')['step'] == 3


def state(step: int) -> dict:
    """A checkpoint's keys (runtime.trainer.Trainer.checkpoint), with tensors and plain values only."""
    return {'model': {'w': torch.full((4,), float(step))}, 'optimizer': None, 'scheduler': None,
            'data': {'epoch': 0, 'index': step}, 'stage': 0, 'step': step, 'spec_hash': 'x', 'summary': {},
            'rng': torch.random.get_rng_state()}


def test_damaged_or_unreadable_checkpoints_are_spec_errors(tmp_path):
    import runtime.checkpoint as R
    path = tmp_path / 'checkpoint.pt'
    R.save_checkpoint(path, dict(state(1), model={'w': torch.zeros(64)}))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    R._digests.clear()
    with pytest.raises(UserError, match='damaged'):
        R.load_checkpoint(path, '--resume 7', '7')
    # a checkpoint without digest (written by an older version) that does not unpickle: a message, not a traceback
    path.with_name('checkpoint.pt.sha256').unlink()
    path.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(UserError, match='cannot read the checkpoint'):
        R.load_checkpoint(path, '--resume 7', '7')
    # an unpickled dict that lacks a checkpoint's keys: named, not a KeyError later
    torch.save({'model': {}}, path)
    with pytest.raises(UserError, match='is not a memspec checkpoint .it lacks data, optimizer'):
        R.load_checkpoint(path, '--resume 7', '7')


def test_a_crafted_pickle_is_refused_unread_even_with_a_matching_sha256(tmp_path):
    """The in-process counterpart of the suite's crafted_checkpoint scenario: the payload demonstrably runs when
    unpickled plainly, and load_checkpoint refuses it without running it."""
    import hashlib
    import io
    import pickle

    from fault_injection.common import Payload

    import runtime.checkpoint as R
    control, ran = tmp_path / 'control', tmp_path / 'ran'
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.is_file()
    path = tmp_path / 'checkpoint.pt'
    buf = io.BytesIO()
    torch.save(dict(state(1), model=Payload(ran)), buf)
    for blob in (buf.getvalue(), pickle.dumps(dict(state(1), model=Payload(ran)))):
        path.write_bytes(blob)
        path.with_name('checkpoint.pt.sha256').write_text(f'{hashlib.sha256(blob).hexdigest()}  checkpoint.pt\n')
        R._digests.clear()
        with pytest.raises(UserError, match='holds objects other than tensors and plain values'):
            R.load_checkpoint(path, '--resume 7', '7')
        assert not ran.exists()


def test_a_library_write_error_on_a_full_disk_is_classified_by_the_filesystem(tmp_path, monkeypatch):
    """torch.save says 'unexpected pos', not ENOSPC: atomic_write asks the filesystem, and names the file and disk."""
    import shutil

    import store.files as F

    def torn(tmp):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(F.shutil, 'disk_usage', lambda p: usage._replace(free=0))
    with pytest.raises(F.WriteFailed) as e:
        F.atomic_write(tmp_path / 'checkpoint.pt', torn)
    assert e.value.errno == errno.ENOSPC and str(e.value).startswith(f"cannot write {tmp_path / 'checkpoint.pt'}: "
                                                                     'No space left on device, on the filesystem at ')
    assert '(0 B free of ' in str(e.value) and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(F.shutil, 'disk_usage', lambda p: usage._replace(free=1 << 30))  # room left: an I/O error
    with pytest.raises(F.WriteFailed) as e:
        F.atomic_write(tmp_path / 'checkpoint.pt', torn)
    assert e.value.errno == errno.EIO and 'unexpected pos' in str(e.value)
    with pytest.raises(ValueError):  # not a write failure: not disguised as one
        F.atomic_write(tmp_path / 'x', lambda tmp: int('x'))


def test_files_are_written_with_the_mode_the_umask_gives(tmp_path):
    import store.files as F
    old = os.umask(0o027)
    try:
        F.write_text(tmp_path / 'a.txt', 'x')
        assert (tmp_path / 'a.txt').stat().st_mode & 0o777 == 0o640  # mkstemp alone would leave 0600
    finally:
        os.umask(old)
