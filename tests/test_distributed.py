"""Multi-process runs through the real CLI on the CPU (gloo): `torchrun --nproc_per_node=2 -m runtime.run` with
Run.parallel = 'ddp' and 'fsdp' follows the single-process trajectory on the same global batches, rank 0 alone
records; a rank killed with SIGKILL stops the job, and the run resumes in one process from the sharded checkpoint the
two ranks wrote, ending where an uninterrupted run ends."""
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'BATCH=4', 'autoencode/Stage.steps=3', 'blank/Stage.steps=3',
        'copy/Stage.steps=2', 'combined/Stage.steps=2', 'Stage.eval_every=100', 'Run.eval_batches=1',
        'Run.log_every=1', "Run.memory_store='none'", 'Run.checkpoint_every=2', 'Memory.noise=0.0']
TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
# rank 1 kills itself with SIGKILL in the first step after the checkpoint of blank_copy step 2 (stage 1)
KILLER = """
import os, signal, sys
import runtime.run
import runtime.train as T
import runtime.trainer as R
written, real_loss, real_checkpoint = [None], T.stage_loss, R.Trainer.checkpoint
def checkpoint(self, stage, step, *args):
    real_checkpoint(self, stage, step, *args)
    written[0] = (stage, step)
def stage_loss(*args, **kwargs):
    if written[0] == (1, 2) and os.environ['RANK'] == '1':
        os.kill(os.getpid(), signal.SIGKILL)
    return real_loss(*args, **kwargs)
T.stage_loss, R.Trainer.checkpoint = stage_loss, checkpoint
runtime.run.main(sys.argv[1:])
"""


def env():
    return dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def argv(out_dir, cache, parallel):
    args = ['specs/frozen_encoder_curriculum.gin', '-b', f"Run.out_dir='{out_dir}'", '-b', f"Data.cache_dir='{cache}'",
            '-b', f"Run.parallel='{parallel}'"]
    for b in TINY:
        args += ['-b', b]
    return args


def launch(cmd, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def torchrun(port: int):
    return [TORCHRUN, '--nproc_per_node=2', f'--master_port={port}']


def recorded(out_dir):
    db = sqlite3.connect(os.path.join(out_dir, 'sacred.db'))
    try:
        rows = db.execute("SELECT step, value FROM memspec_metrics WHERE name = 'train/loss' ORDER BY step").fetchall()
        runs = db.execute('SELECT run_id, status FROM run').fetchall()
    finally:
        db.close()
    return rows, runs


def final_weights(out_dir):
    (folder,) = [p for p in os.listdir(out_dir) if os.path.isfile(os.path.join(out_dir, p, 'final.safetensors'))]
    return load_file(os.path.join(out_dir, folder, 'final.safetensors'))


def close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < atol, worst


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('parallel')
    cache = tmp / 'cache'
    out = {'single': tmp / 'single', 'ddp': tmp / 'ddp', 'fsdp': tmp / 'fsdp'}
    launch([sys.executable, '-m', 'runtime.run'] + argv(out['single'], cache, 'none'))
    launch(torchrun(29517) + ['-m', 'runtime.run'] + argv(out['ddp'], cache, 'ddp'))
    launch(torchrun(29518) + ['-m', 'runtime.run'] + argv(out['fsdp'], cache, 'fsdp'))
    return tmp, cache, out


@pytest.mark.parametrize('parallel', ['ddp', 'fsdp'])
def test_two_processes_match_one(runs, parallel):
    _, _, out = runs
    (single, _), (multi, status) = recorded(out['single']), recorded(out[parallel])
    assert len(single) == 10 and [s for s, _ in single] == [s for s, _ in multi]
    for (step, a), (_, b) in zip(single, multi):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (step, a, b)
    close(final_weights(out['single']), final_weights(out[parallel]))
    assert status == [('0', 'COMPLETED')]  # rank 0 alone records


def test_run_parallel_none_refuses_a_multi_process_job(runs, tmp_path):
    _, cache, _ = runs
    proc = launch(torchrun(29519) + ['-m', 'runtime.run'] + argv(tmp_path / 'none', cache, 'none'), check=False)
    assert proc.returncode != 0
    assert "Run.parallel = 'none' but this job has 2 processes (WORLD_SIZE)" in proc.stderr
    assert "fix: bind Run.parallel = 'ddp'" in proc.stderr
    for package in ('compiler', 'runtime', 'store'):  # no traceback through our code (torchrun prints its own, and
        assert f'File "{Path(ROOT) / package}' not in proc.stderr  # the venv may live inside the repository, as in CI)


def test_a_killed_rank_stops_the_job_and_the_run_resumes_in_one_process(runs, tmp_path):
    _, cache, out = runs
    killer = tmp_path / 'killer.py'
    killer.write_text(KILLER)
    job = tmp_path / 'job'
    proc = launch(torchrun(29520) + [str(killer)] + argv(job, cache, 'fsdp'), check=False)
    assert proc.returncode != 0, 'the job went on without its rank 1'
    assert f'exitcode  : -{int(signal.SIGKILL)}' in proc.stderr  # torchrun names the killed rank
    rows, status = recorded(job)
    (run_id, state), = status
    # rank 0 stops on torchrun's SIGTERM or on its collective's lost peer (runtime.distributed.RankLost), whichever
    # comes first: either way INTERRUPTED, resumable
    assert state == 'INTERRUPTED', state
    assert 'the run is recorded as INTERRUPTED; continue it with --resume' in proc.stderr
    (folder,) = [p for p in job.iterdir() if p.name.startswith(f'{run_id}-')]
    ck = torch.load(folder / 'checkpoint.pt', weights_only=True)
    assert (ck['stage'], ck['step'], ck['world']) == (1, 2, 2)
    assert len(ck['shards']['files']) == 2  # each rank wrote its part
    assert not (folder / 'final.safetensors').exists()

    resumed = launch([sys.executable, '-m', 'runtime.run'] + argv(job, cache, 'fsdp') + ['--resume', run_id])
    assert 'COMPLETED' in resumed.stdout
    rows, status = recorded(job)
    assert status == [(run_id, 'COMPLETED')]
    assert [s for s, _ in rows] == list(range(1, 11))
    close(final_weights(out['single']), final_weights(job))
