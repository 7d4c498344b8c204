"""Executors: how a member's `python -m runtime.run` process runs (local processes, or submitit: Slurm or its local
executor), and the command-line options that choose one."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compiler.args import integer, real
from runtime.launch import DistributedMember, slurm_params, submitit_cluster

EXECUTORS = ('local', 'slurm', 'submitit-local')
SLURM_MINUTES = 24 * 60  # submitit-local's time limit (submitit's own default of 2 minutes would stop real runs)

def run_member(argv: list[str], env: dict, log: str, cwd: str, shown: str) -> dict:
    """One member: `python -m runtime.run ARGV` with its output in LOG. A plain module-level function, so submitit can
    pickle it and run it on a Slurm node (or in its local executor)."""
    start = time.time()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)  # never through a planted link
    with open(fd, 'a') as out:
        out.write(f'$ {shown}\n')
        out.flush()
        code = subprocess.run([sys.executable, '-m', 'runtime.run', *argv], cwd=cwd, env={**os.environ, **env},
                              stdout=out, stderr=subprocess.STDOUT).returncode
    return {'code': code, 'start': start, 'stop': time.time()}


class LocalProcesses:
    """--jobs N `python -m runtime.run` processes at once on this machine."""

    def __init__(self, jobs: int):
        self.pool = ThreadPoolExecutor(max_workers=jobs)
        self.threads = max(1, cores() // jobs)

    def start(self, *args):
        return self.pool.submit(run_member, *args)

    def close(self):
        self.pool.shutdown(wait=False)


class Submitit:
    """One submitit job per member: Slurm, or submitit's LocalExecutor (the same code path without Slurm). A thread per
    job in flight waits on its result, so the driver waits on concurrent.futures like the local executor's."""

    def __init__(self, cluster: str, folder: Path, params: dict, jobs: int, threads: int):
        import submitit
        self.executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        self.executor.update_parameters(**params)
        self.waiters = ThreadPoolExecutor(max_workers=jobs)
        self.threads = threads
        self.ranks = params.get('nodes', 1) * params.get('tasks_per_node', 1)

    def start(self, *args):
        if self.ranks > 1:  # a multi-rank run per member: a task per rank, requeued and resumed on preemption
            job = self.executor.submit(DistributedMember(*args))
            return self.waiters.submit(lambda job: job.results()[0], job)
        return self.waiters.submit(lambda job: job.result(), self.executor.submit(run_member, *args))

    def close(self):
        self.waiters.shutdown(wait=False)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def executor_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--jobs', type=integer(1, 4096), default=1,
                    help='members running (or queued on Slurm) at once (default 1)')
    ap.add_argument('--executor', choices=EXECUTORS, default='local',
                    help='local: python -m runtime.run processes here; slurm: one submitit job per member; '
                    "submitit-local: submitit's local executor (the Slurm code path without Slurm)")
    ap.add_argument('--slurm-time', type=integer(1, 10 ** 6), metavar='MINUTES',
                    help='time limit of each member (Slurm: required)')
    ap.add_argument('--slurm-partition', help='Slurm partition')
    ap.add_argument('--gpus-per-node', type=integer(0, 1024), help='GPUs of each member: with more than one, a rank '
                    'per GPU (the spec then binds Run.parallel)')
    ap.add_argument('--nodes', type=integer(1, 10 ** 5), help='nodes of each member (Slurm)')
    ap.add_argument('--tasks-per-node', type=integer(1, 1024),
                    help='ranks of each member per node (default: --gpus-per-node)')
    ap.add_argument('--cpus-per-task', type=integer(1, 10 ** 5),
                    help='CPU cores of each member (Slurm; also its thread count)')
    ap.add_argument('--mem-gb', type=real(0, 10 ** 6, above=True), help='memory of each member')
    ap.add_argument('--slurm-param', action='append', default=[], metavar='KEY=VALUE',
                    help="any other submitit Slurm parameter, e.g. --slurm-param account=lab --slurm-param qos=high")


def make_executor(args, folder: Path):
    if args.executor == 'local':
        return LocalProcesses(args.jobs)
    cluster = submitit_cluster(args, 'every member', 'give --slurm-time MINUTES',
                               'run the sweep on a Slurm login node, or use --executor local')
    tasks = args.tasks_per_node or (args.gpus_per_node if (args.gpus_per_node or 0) > 1 else None)
    params = {'timeout_min': args.slurm_time or SLURM_MINUTES, 'gpus_per_node': args.gpus_per_node,
              'nodes': args.nodes, 'tasks_per_node': tasks,
              'cpus_per_task': args.cpus_per_task, 'mem_gb': args.mem_gb, 'slurm_partition': args.slurm_partition,
              'name': 'memspec'}
    params = {k: v for k, v in params.items() if v is not None}
    params.update(slurm_params(args.slurm_param))
    threads = (args.cpus_per_task or 1) if cluster == 'slurm' else max(1, cores() // args.jobs)
    return Submitit(cluster, folder / 'submitit', params, args.jobs, threads)
