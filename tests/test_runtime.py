"""Training runtime (runtime/run.py, runtime/train.py): freezing, stage outputs, resume after a kill, user errors,
divergence and init_from, on tiny curricula that run in seconds."""
import json
import math
import signal
import subprocess
import sys

import torch
from conftest import (
    FLAGSHIP,
    FLAGSHIP_STAGES,
    PROBE,
    ROOT,
    TINY,
    TINY_FLAGSHIP,
    TINY_PROBE,
    db_rows,
    rt_argv,
    rt_bindings,
    rt_env,
    rt_main,
    rt_run_dir,
    rt_run_ids,
)
from safetensors.torch import load_file
from test_tracking import assert_events_equal_database

from runtime.tracking import WALL_CLOCK


def stage_weights(run_dir, stage):
    return load_file(run_dir / 'stages' / f'{stage}.safetensors')


def component(state, prefix):
    return {k: v for k, v in state.items() if k.startswith(prefix + '.')}


def initial_weights(bindings, spec=FLAGSHIP):
    """The graph the runtime starts from: same plan, same seed, the vocabulary the data actually has."""
    from compiler.model import build
    from compiler.spec import load
    from runtime.data import prepare
    plan = load([spec], bindings).plan
    vocab = prepare(plan, progress=False).vocab_size
    return build(plan, vocab).state_dict(), vocab


def run_status(db, run_id):
    return db_rows(db, 'SELECT status FROM run WHERE run_id = ?', str(run_id))


def metrics(db, run_id):
    return db_rows(db, 'SELECT name, step, value FROM memspec_metrics WHERE run_id = ? ORDER BY name, step',
                   str(run_id))


# ------------------------------------------------------------------------------------------------- freezing

def test_frozen_encoder_is_bit_identical_across_later_stages(flagship_run):
    stages = {s: stage_weights(flagship_run.run_dir, s) for s in FLAGSHIP_STAGES}
    final = load_file(flagship_run.run_dir / 'final.safetensors')
    enc = component(stages['autoencode'], 'encoder')
    assert enc, 'no encoder.* tensors in the stage checkpoint'
    # blank_copy, copy and combined freeze 'encoder': every tensor stays exactly what the autoencoder left
    for s in ('blank_copy', 'copy', 'combined'):
        for k, v in enc.items():
            assert torch.equal(stages[s][k], v), f'{k} changed in frozen stage {s}'
    for k, v in enc.items():
        assert torch.equal(final[k], v), f'{k} of final.safetensors differs from the autoencode stage end'
    # ... while the decoder trained in every one of them
    for before, after in (('autoencode', 'blank_copy'), ('blank_copy', 'copy'), ('copy', 'combined')):
        dec_a, dec_b = component(stages[before], 'decoder'), component(stages[after], 'decoder')
        unchanged = [k for k in dec_a if torch.equal(dec_a[k], dec_b[k])]
        assert dec_a and not unchanged, f'decoder tensors not trained by stage {after}: {unchanged}'


def test_autoencode_stage_leaves_the_frozen_decoder_at_its_initial_weights(flagship_run):
    init, vocab = initial_weights(flagship_run.bindings)
    ae = stage_weights(flagship_run.run_dir, 'autoencode')
    assert ae['decoder.head.weight'].shape[0] == vocab
    dec = component(init, 'decoder')
    assert dec and set(dec) == set(component(ae, 'decoder'))
    for k, v in dec.items():
        assert torch.equal(ae[k], v), f'frozen {k} moved during the autoencode stage'
    # the stage did train: the encoder and the autoencoder's own decoder left their initial values
    for prefix in ('encoder', 'ae_decoder'):
        moved = [k for k, v in component(init, prefix).items() if not torch.equal(ae[k], v)]
        assert moved, f'no {prefix}.* tensor was trained in the autoencode stage'


# ------------------------------------------------------------------------------------------------- outputs

def test_run_completes_with_a_finite_summary_per_stage(flagship_run):
    d = flagship_run.run_dir
    for name in ('checkpoint.pt', 'final.safetensors', 'summary.md', 'summary.json', 'operative.gin'):
        assert (d / name).is_file(), name
    assert sorted(p.stem for p in (d / 'stages').glob('*.safetensors')) == sorted(FLAGSHIP_STAGES)
    summary = flagship_run.summary
    assert list(summary) == list(FLAGSHIP_STAGES)
    for stage, m in summary.items():
        for key in ('blank_copy.token_accuracy', 'blank_copy_ablated.token_accuracy', 'clm.ce',
                    'autoencode.token_accuracy', 'copy.token_accuracy', 'clm.bits_per_byte'):
            assert key in m, f'{stage}: {key} missing from {sorted(m)}'
        for key, v in m.items():
            assert isinstance(v, float) and math.isfinite(v), f'{stage}: {key} = {v!r}'
        for key in ('blank_copy.token_accuracy', 'autoencode.token_accuracy'):
            assert 0.0 <= m[key] <= 1.0
    assert run_status(flagship_run.db, flagship_run.run_id) == [('COMPLETED',)]
    table = (d / 'summary.md').read_text()
    assert all(f'| {s} |' in table for s in FLAGSHIP_STAGES)


# ------------------------------------------------------------------------------------------------- resume

# A run killed with SIGKILL (no cleanup of any kind) in the middle of its second stage: 3 autoencode steps, then
# blank_copy is killed as it starts its step 4, after its step 3 was trained and logged but not checkpointed (the
# checkpoint is from step 2). Just before the kill a Sacred heartbeat sends the metrics logged so far, as the
# heartbeat thread may do at any time, so the database holds metrics from after the checkpoint: the resume must
# replace them, not duplicate them.
RESUME = TINY + ['autoencode/Stage.steps=3', 'blank/Stage.steps=6', 'copy/Stage.steps=2', 'combined/Stage.steps=2',
                 'Run.checkpoint_every=2']
KILL_AT_CALL = 3 + 4
KILLER = f"""
import os, signal, sys
import runtime.run
import runtime.trainer as R
import runtime.train as T
calls, runs = [0], []
real_stage_loss, real_run = T.stage_loss, R.Trainer.run
def stage_loss(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {KILL_AT_CALL}:
        runs[0]._emit_heartbeat()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_stage_loss(*args, **kwargs)
def run(self, _run):
    runs.append(_run)
    return real_run(self, _run)
T.stage_loss, R.Trainer.run = stage_loss, run
runtime.run.main(sys.argv[1:])
"""


def test_resume_after_kill_continues_the_same_trajectory(tmp_path, rt_cache):
    # B is started first and killed mid-run in a subprocess while A runs uninterrupted in this process (the two
    # share the 2 cores); each has its own out_dir and database, so their run ids cannot collide.
    out_a, out_b = tmp_path / 'a', tmp_path / 'b'
    argv_a, argv_b = (rt_argv(FLAGSHIP, o, rt_cache, RESUME) for o in (out_a, out_b))
    killed = subprocess.Popen([sys.executable, '-c', KILLER, *argv_b], cwd=ROOT, env=rt_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rt_main(argv_a) == 0
        _, err = killed.communicate(timeout=600)
    finally:
        killed.kill()
    assert killed.returncode == -signal.SIGKILL, f'run B was not killed (exit {killed.returncode}):\n{err[-3000:]}'
    (a_id,), (b_id,) = rt_run_ids(out_a), rt_run_ids(out_b)
    db_a, db_b = out_a / 'sacred.db', out_b / 'sacred.db'
    ck = torch.load(rt_run_dir(out_b, b_id) / 'checkpoint.pt', weights_only=True)
    assert (ck['stage'], ck['step']) == (1, 2), 'the kill was meant to land in blank_copy after its step-2 checkpoint'
    assert not (rt_run_dir(out_b, b_id) / 'final.safetensors').exists()
    assert run_status(db_b, b_id) == [('RUNNING',)]
    logged = db_rows(db_b, "SELECT step FROM memspec_metrics WHERE run_id = ? AND name = 'train/loss' ORDER BY step",
                     b_id)
    assert logged == [(s,) for s in range(1, 3 + 3 + 1)], 'the killed run should have recorded steps 1-6'

    # B continues from its checkpoint
    assert rt_main(argv_b + ['--resume', b_id]) == 0
    assert rt_run_ids(out_b) == {b_id}
    fa, fb = (load_file(rt_run_dir(o, i) / 'final.safetensors') for o, i in ((out_a, a_id), (out_b, b_id)))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.allclose(fa[k], fb[k], rtol=0, atol=1e-6), f'{k} differs after resume'
    sa, sb = (json.loads((rt_run_dir(o, i) / 'summary.json').read_text()) for o, i in ((out_a, a_id), (out_b, b_id)))
    assert list(sa) == list(sb) == list(FLAGSHIP_STAGES)

    ma, mb = metrics(db_a, a_id), metrics(db_b, b_id)
    loss_a = [(s, v) for n, s, v in ma if n == 'train/loss']
    loss_b = [(s, v) for n, s, v in mb if n == 'train/loss']
    assert [s for s, _ in loss_a] == list(range(1, 3 + 6 + 2 + 2 + 1))
    assert [s for s, _ in loss_b] == [s for s, _ in loss_a], \
        'train/loss steps of the resumed run differ (lost or duplicated)'
    for (s, va), (_, vb) in zip(loss_a, loss_b):
        assert abs(va - vb) <= 1e-6, f'train/loss at step {s}: {va} vs {vb}'
    # every other metric too: same names and steps, no duplicates, same values (throughput measures the machine)
    assert [(n, s) for n, s, _ in mb] == [(n, s) for n, s, _ in ma]
    for (n, s, va), (_, _, vb) in zip(ma, mb):
        assert n in WALL_CLOCK or abs(va - vb) <= 1e-6, f'{n} at step {s}: {va} vs {vb}'
    # TensorBoard forgot what the killed process logged after its checkpoint, as the database did
    assert_events_equal_database(rt_run_dir(out_b, b_id) / 'tensorboard', db_b, b_id)
    assert len(list((rt_run_dir(out_b, b_id) / 'tensorboard').glob('events.out.tfevents.*'))) == 2
    ((out,),) = db_rows(db_b, 'SELECT captured_out FROM run')
    assert out.count('--- resumed ---') == 1 and out.index('stage 1/4') < out.index('--- resumed ---')

    # the resume re-attached to B's row: one row, now COMPLETED
    assert run_status(db_b, b_id) == [('COMPLETED',)]
    assert db_rows(db_b, 'SELECT COUNT(*) FROM run') == [(1,)]
    assert run_status(db_a, a_id) == [('COMPLETED',)]


# ------------------------------------------------------------------------------------------------- user errors

def assert_refused(r, *needles):
    assert r.returncode == 2, f'exit {r.returncode}:\n{r.stderr[-3000:]}'
    for n in needles:
        assert n in r.stderr, f'{n!r} not in:\n{r.stderr[-3000:]}'
    assert 'Traceback' not in r.stderr, r.stderr[-3000:]


def test_resume_of_an_unknown_run_exits_2_and_creates_nothing(rt_refusals):
    out, r = rt_refusals.cases['unknown_resume']
    assert_refused(r, '--resume 999')
    assert rt_run_ids(out) == set()
    assert not (out / 'sacred.db').exists()


def test_resume_with_a_different_spec_exits_2_naming_the_hash_mismatch(rt_refusals, flagship_run):
    (out, r), before = rt_refusals.cases['other_spec'], rt_refusals.flagship_before
    assert_refused(r, f'--resume {flagship_run.run_id}', 'different plan', 'hash',
                   'bindings that differ: combined/Stage.steps: 2 in the run, 3 here')
    # the refused resume touched neither the run's checkpoint nor its record
    assert (flagship_run.run_dir / 'checkpoint.pt').stat().st_mtime_ns == before['checkpoint']
    assert db_rows(flagship_run.db, 'SELECT run_id, status FROM run ORDER BY id') == before['rows']
    assert rt_run_ids(out) == before['runs']


# ------------------------------------------------------------------------------------------------- divergence

def test_divergence_stops_the_run_with_exit_1_and_status_failed(tmp_path, rt_cache, capsys):
    out = tmp_path / 'runs'
    argv = rt_argv(FLAGSHIP, out, rt_cache, TINY_FLAGSHIP + ['autoencode/Stage.lr=1e30', 'autoencode/Stage.warmup=0'])
    assert rt_main(argv) == 1
    err = capsys.readouterr().err
    assert 'diverged' in err and 'Stage.lr' in err, err[-2000:]
    assert 'Traceback' not in err
    (run_id,) = rt_run_ids(out)
    assert run_status(out / 'sacred.db', run_id) == [('FAILED',)]
    assert not (rt_run_dir(out, run_id) / 'final.safetensors').exists()
    assert not (rt_run_dir(out, run_id) / 'stages' / 'autoencode.safetensors').exists()


# ------------------------------------------------------------------------------------------------- init_from

def test_init_from_copies_a_runs_stage_weights_and_keeps_them_frozen(flagship_run, rt_cache):
    out = flagship_run.out_dir
    before = rt_run_ids(out)
    src = stage_weights(flagship_run.run_dir, 'autoencode')
    argv = rt_argv(PROBE, out, rt_cache, TINY_PROBE + [
        f"probe/Stage.init_from = {{'encoder': 'run:{flagship_run.run_id}/autoencode'}}"])
    assert rt_main(argv) == 0
    (probe_id,) = rt_run_ids(out) - before
    probe = load_file(rt_run_dir(out, probe_id) / 'final.safetensors')
    init, _ = initial_weights(rt_bindings(argv), PROBE)
    enc = component(src, 'encoder')
    assert enc and set(component(probe, 'encoder')) == set(enc)
    for k, v in enc.items():
        assert torch.equal(probe[k], v), f'{k} was not copied from run {flagship_run.run_id}/autoencode (or moved)'
    # meaningful only because the source differs from the probe's own initial encoder ...
    assert any(not torch.equal(init[k], v) for k, v in enc.items())
    # ... and the probe trained its decoder meanwhile
    assert any(not torch.equal(init[k], v) for k, v in component(probe, 'decoder').items())
    # the source is recorded by its sha256, in the config and the run folder's marker
    from compiler.digest import sha256_file
    ((config,),) = db_rows(out / 'sacred.db', 'SELECT config FROM run WHERE run_id = ?', probe_id)
    (ref,) = json.loads(config)['provenance']['init_from']['probe']['encoder']['files']
    source = flagship_run.run_dir / 'stages' / 'autoencode.safetensors'
    assert ref['sha256'] == sha256_file(source) and ref['path'] == str(source.resolve())
    marker = json.loads((rt_run_dir(out, probe_id) / 'run.json').read_text())
    assert marker['provenance']['init_from']['probe']['encoder']['files'] == [ref]


def test_init_from_an_unknown_run_exits_2_and_leaves_nothing_behind(rt_refusals):
    out, r = rt_refusals.cases['unknown_init']
    assert_refused(r, "init_from 'run:999/x'")
    assert rt_run_ids(out) == set(), 'a refused run left a run folder behind'
    if (out / 'sacred.db').exists():
        assert db_rows(out / 'sacred.db', "SELECT name FROM sqlite_master WHERE name = 'run'") == [] or \
            db_rows(out / 'sacred.db', 'SELECT COUNT(*) FROM run') == [(0,)], 'a refused run was recorded'
