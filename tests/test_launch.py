"""Multi-process runs as submitit jobs (runtime/launch.py), on submitit's local executor (the Slurm code path
without Slurm; CPU, gloo): a job of two ranks trains one run like torchrun does, and a job preempted after a
checkpoint is requeued and continues the same run with --resume to the weights of an uninterrupted run."""
import os
import subprocess
import sys

import pytest
import torch
from test_distributed import ROOT, argv, close, final_weights, launch, recorded

# the rank 0 process of the job's first run sends its submitit task (its parent) the preemption signal, USR2, right
# after the checkpoint of stage 1 step 2, as Slurm does ahead of a time limit; the requeued job (--resume) does not
PREEMPTER = """
import os, signal, sys
import runtime.run
import runtime.trainer as R
real = R.Trainer.checkpoint
def checkpoint(trainer, stage, step, *args):
    real(trainer, stage, step, *args)
    if (stage, step) == (1, 2) and trainer.rank == 0 and '--resume' not in sys.argv:
        os.kill(os.getppid(), signal.SIGUSR2)
R.Trainer.checkpoint = checkpoint
runtime.run.main(sys.argv[1:])
"""
SUBMIT = """
import sys
sys.path[:0] = [{root!r}]
from pathlib import Path
from runtime import launch
args = launch.parse({argv!r} + ['--executor', 'submitit-local', '--tasks-per-node', '2'])
folder = Path({folder!r})
run = launch.DistributedRun({argv!r}, str(folder), {root!r})
run.command = [sys.executable, {script!r}]
job = launch.executor(args, folder).submit(run)
job.results()
"""


def env():
    return dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]))


@pytest.fixture(scope='module')
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('launch')
    launch([sys.executable, '-m', 'runtime.run'] + argv(tmp / 'single', tmp / 'cache', 'ddp'))
    return tmp


def test_a_local_submitit_job_of_two_ranks_trains_one_run(single):
    out = single / 'job'
    proc = subprocess.run([sys.executable, '-m', 'runtime.launch'] + argv(out, single / 'cache', 'ddp')
                          + ['--executor', 'submitit-local', '--tasks-per-node', '2', '--wait'],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'node(s) x 2 rank(s)' in proc.stdout
    _, status = recorded(out)
    assert status == [('0', 'COMPLETED')]
    (folder,) = (out / 'launches').iterdir()
    assert (folder / 'run_id').read_text() == '0'
    ck = torch.load(next(out.glob('0-*')) / 'checkpoint.pt', weights_only=True)
    assert ck['world'] == 2
    close(final_weights(single / 'single'), final_weights(out))


def test_a_preempted_job_is_requeued_and_resumes_its_run(single):
    out = single / 'preempted'
    (out / 'job').mkdir(parents=True)
    preempter = out / 'preempter.py'
    preempter.write_text(PREEMPTER)
    script = SUBMIT.format(root=ROOT, argv=argv(out, single / 'cache', 'ddp'), folder=str(out / 'job'),
                           script=str(preempter))
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = ''.join(p.read_text() for p in sorted((out / 'job').glob('*_log.*')))  # .out and .err
    assert 'this job is preempted' in logs and 'Requeued job' in logs, logs[-3000:]
    rows, status = recorded(out)
    assert status == [('0', 'COMPLETED')]  # one run: the requeued job resumed it
    assert [s for s, _ in rows] == list(range(1, 11))
    close(final_weights(single / 'single'), final_weights(out))


def test_sweep_members_can_be_multi_rank_runs(single):
    """runtime.sweep's submitit executor with --tasks-per-node 2: each member is one run of two ranks."""
    out = single / 'sweep'
    proc = subprocess.run([sys.executable, '-m', 'runtime.run'] + argv(out, single / 'cache', 'ddp')
                          + ['--sweep', 'Run.seed=[0]', '--executor', 'submitit-local', '--tasks-per-node', '2'],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _, status = recorded(out)
    assert status == [('0', 'COMPLETED')]
    ck = torch.load(next(out.glob('0-*')) / 'checkpoint.pt', weights_only=True)
    assert ck['world'] == 2
    logs = sorted(p.name for p in (out / 'sweeps').rglob('*.log*'))
    assert len(logs) == 2 and logs[1].endswith('.log.rank1'), logs
    close(final_weights(single / 'single'), final_weights(out))
