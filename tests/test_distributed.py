"""torchrun DDP on CPU (gloo): 2 processes with the same global batch follow the single-process trajectory."""
import os
import sqlite3
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['-b', 'Data.vocab_size=300', '-b', 'D_MODEL=32', '-b', 'N_HEADS=2', '-b', 'BATCH=4',
        '-b', 'autoencode/Stage.steps=3', '-b', 'blank/Stage.steps=3', '-b', 'copy/Stage.steps=2',
        '-b', 'combined/Stage.steps=2', '-b', 'Stage.eval_every=100', '-b', 'Run.eval_batches=1',
        '-b', 'Run.log_every=1', '-b', "Run.memory_store='none'"]


def _run(cmd, out_dir, cache):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1')
    args = cmd + ['specs/frozen_encoder_curriculum.gin', *TINY, '-b', f"Run.out_dir='{out_dir}'",
                  '-b', f"Data.cache_dir='{cache}'"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = sqlite3.connect(os.path.join(out_dir, 'sacred.db'))
    rows = db.execute("SELECT step, value FROM memspec_metrics WHERE name = 'train/loss' ORDER BY step").fetchall()
    runs = db.execute('SELECT run_id, status FROM run').fetchall()
    return rows, runs


@pytest.fixture(scope='module')
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    cache = tmp / 'cache'
    single = _run([sys.executable, '-m', 'runtime.run'], tmp / 'single', cache)
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    ddp = _run([torchrun, '--nproc_per_node=2', '--master_port=29517', '-m', 'runtime.run'], tmp / 'ddp', cache)
    return single, ddp


def test_two_processes_match_one(both):
    (single, _), (ddp, _) = both
    assert len(single) == 10 and [s for s, _ in single] == [s for s, _ in ddp]
    for (step, a), (_, b) in zip(single, ddp):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a)), (step, a, b)


def test_only_rank_zero_records(both):
    _, (_, runs) = both
    assert runs == [('0', 'COMPLETED')]
