"""python -m runtime.launch SPEC [more.gin ...] [-b BINDING ...] [--db URL] [--resume RUN_ID] --nodes M
    --gpus-per-node N [--executor slurm|submitit-local] [--slurm-time MINUTES] [--slurm-partition P] ...

One run on M nodes x N GPUs as one submitit job (Slurm, or submitit's local executor: the same code path on this
machine): a task per GPU, each a rank of `python -m runtime.run` with the arguments given here, its torch.distributed
environment set by submitit.helpers.TorchDistributedEnvironment (runtime/distributed.py then starts the process
group). The spec's Run.parallel says how the ranks share the work ('ddp' or 'fsdp'). The same run starts locally with
`torchrun --nproc_per_node=N -m runtime.run SPEC ...`.

A job that reaches its time limit or is preempted is requeued by submitit (Slurm sends USR2 ahead of the limit): the
requeued job continues the same run with --resume from its last checkpoint, on however many GPUs it then gets (the
checkpoint is sharded; it resumes at any world size). Rank 0 writes the run's id to <folder>/run_id once the run is
recorded, which is how the requeued job knows what to resume.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

from compiler.errors import SpecError, UserError, cli

ID_FILE = 'run_id'


class DistributedRun:
    """The callable of one submitit task: exports the job's torch.distributed environment and runs this rank of
    `python -m runtime.run ARGV` as its child. Checkpointable: on a time limit or preemption submitit calls
    `checkpoint` (rank 0) and requeues what it returns; the child gets SIGTERM first, so it stops as INTERRUPTED."""

    def __init__(self, argv: list[str], folder: str, cwd: str, stdout: str | None = None):
        self.argv, self.folder, self.cwd, self.stdout = list(argv), folder, cwd, stdout
        self.command = [sys.executable, '-m', 'runtime.run']

    def __call__(self) -> int:
        import submitit
        code = self.run_rank()
        # the run's outcome is rank 0's: another rank fails when rank 0 stops (preempted, or failed itself)
        if code and submitit.JobEnvironment().global_rank == 0:
            raise RuntimeError(f'python -m runtime.run exited with code {code}')
        return code

    def run_rank(self) -> int:
        """This task's rank of the run -> its exit code. A requeue (preemption) leaves with submitit's exit."""
        import signal
        import subprocess

        import submitit
        env = submitit.helpers.TorchDistributedEnvironment()
        # several tasks per node share the node's GPUs: each finds its own by LOCAL_RANK (runtime.distributed)
        env.export(set_cuda_visible_devices=False, overwrite=True)
        argv = self.argv + ['--record-id-to', str(Path(self.folder) / ID_FILE)] * (env.rank == 0)
        out = open(self.stdout, 'a') if self.stdout else None  # noqa: SIM115  (closed below)
        try:
            child = subprocess.Popen([*self.command, *argv], cwd=self.cwd, stdout=out, stderr=out and subprocess.STDOUT)
            previous, fired = signal.getsignal(signal.SIGUSR2), []

            def preempted(signum, frame):  # stop the rank (INTERRUPTED) first; its exit ends the wait below
                fired.append((signum, frame))
                child.send_signal(signal.SIGTERM)

            signal.signal(signal.SIGUSR2, preempted)
            code = child.wait()
            if fired and callable(previous):  # then submitit checkpoints (rank 0), requeues and exits
                previous(*fired[0])
            return code
        finally:
            if out is not None:
                out.close()

    def resume_argv(self) -> list[str]:
        """The arguments that continue this job's run: --resume with the id rank 0 recorded (none yet: the run was
        never recorded, so it starts again)."""
        path = Path(self.folder) / ID_FILE
        if '--resume' in self.argv or not path.is_file():
            return self.argv
        return self.argv + ['--resume', path.read_text().strip()]

    def checkpoint(self, *args, **kwargs):
        import submitit
        again = copy.copy(self)
        again.argv = self.resume_argv()
        return submitit.helpers.DelayedSubmission(again)


class DistributedMember(DistributedRun):
    """A sweep member that is a multi-rank run (runtime/sweep.py with --nodes / --tasks-per-node / --gpus-per-node
    above one rank): a task per rank, rank 0's output in the member's log, rank k's in LOG.rank<k>; returns what
    sweep.run_member returns."""

    def __init__(self, argv: list[str], env: dict, log: str, cwd: str, shown: str):
        super().__init__(argv, str(Path(log).with_suffix('')), cwd, log)
        self.env, self.shown = env, shown

    def __call__(self) -> dict:
        import time

        import submitit
        os.environ.update(self.env)
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        rank = submitit.JobEnvironment().global_rank
        if rank:
            self.stdout = f'{self.stdout}.rank{rank}'
        with open(self.stdout, 'a') as out:
            out.write(f'$ {self.shown}  (rank {rank})\n')
        start = time.time()
        code = self.run_rank()
        return {'code': code, 'start': start, 'stop': time.time()}


def submitit_cluster(args, what: str, fix_time: str, fix_no_slurm: str) -> str:
    """submitit's cluster for --executor ('slurm' or 'local'), refusing a Slurm job without a time limit (submitit's
    default would stop `what` after 5 min) or on a machine that cannot submit one."""
    cluster = 'slurm' if args.executor == 'slurm' else 'local'
    if cluster == 'slurm' and args.slurm_time is None:
        raise UserError('--executor slurm', f"no time limit: submitit's default would stop {what} after 5 min",
                        fix_time)
    if cluster == 'slurm' and shutil.which('sbatch') is None:
        raise UserError('--executor slurm', 'sbatch is not on PATH: this machine cannot submit Slurm jobs',
                        fix_no_slurm)
    return cluster


def slurm_params(items: list[str]) -> dict:
    """--slurm-param KEY=VALUE items as submitit's slurm_<KEY> parameters, each KEY checked against submitit's list."""
    import submitit
    valid, params = submitit.SlurmExecutor._valid_parameters(), {}
    for item in items:
        key, eq, value = item.partition('=')
        if not eq or key not in valid:
            raise UserError(f'--slurm-param {item}', f"not a submitit Slurm parameter: '{key}'",
                            f"write KEY=VALUE with KEY one of: {', '.join(sorted(valid))}")
        params[f'slurm_{key}'] = int(value) if value.isdigit() else value
    return params


def executor(args, folder: Path):
    """The submitit executor of one run's job: M nodes, a task per GPU (or --tasks-per-node on CPUs)."""
    import submitit
    cluster = submitit_cluster(args, 'the job',
                               'give --slurm-time MINUTES (the job is requeued and resumed at the limit)',
                               'submit from a Slurm login node, or run locally: torchrun --nproc_per_node=N -m '
                               'runtime.run')
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    if cluster == 'local' and args.nodes != 1:
        raise UserError(f'--nodes {args.nodes}', "submitit's local executor runs on this one machine",
                        'use --nodes 1, or --executor slurm')
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = {'nodes': args.nodes, 'tasks_per_node': tasks, 'gpus_per_node': args.gpus_per_node or None,
              'cpus_per_task': args.cpus_per_task, 'mem_gb': args.mem_gb, 'slurm_partition': args.slurm_partition,
              'timeout_min': args.slurm_time or 24 * 60, 'name': 'memspec'}
    params.update(slurm_params(args.slurm_param))
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def submit(args, run_argv: list[str]):
    """Submit the job; -> (submitit job, its folder)."""
    from compiler.spec import load
    plan = load(args.specs, args.binding).plan  # a bad spec is refused here, before anything is queued
    world = args.nodes * (args.tasks_per_node or args.gpus_per_node or 1)
    if world > 1 and plan.run.parallel == 'none':
        raise SpecError('Run.parallel', f"'none' but the job has {world} processes",
                        "bind Run.parallel = 'ddp' (or 'fsdp' to shard the model)")
    folder = Path(plan.run.out_dir) / 'launches' / f'{plan.run.name}-{os.getpid()}-{os.urandom(3).hex()}'
    folder.mkdir(parents=True)
    job = executor(args, folder).submit(DistributedRun(run_argv, str(folder), os.getcwd()))
    return job, folder


def parse(argv=None):
    from compiler.__main__ import parser
    ap = parser('python -m runtime.launch', __doc__.split('\n\n')[0])
    ap.add_argument('--db', help='observer database URL (default sqlite:///<Run.out_dir>/sacred.db)')
    ap.add_argument('--resume', metavar='RUN_ID', help='continue a stopped run (its id), on this job')
    ap.add_argument('--executor', choices=('slurm', 'submitit-local'), default='slurm')
    ap.add_argument('--nodes', type=int, default=1)
    ap.add_argument('--gpus-per-node', type=int, default=0, help='GPUs per node: one rank (task) each')
    ap.add_argument('--tasks-per-node', type=int, help='ranks per node (default: --gpus-per-node; CPU jobs)')
    ap.add_argument('--slurm-time', type=int, metavar='MINUTES', help='time limit (Slurm: required)')
    ap.add_argument('--slurm-partition')
    ap.add_argument('--cpus-per-task', type=int)
    ap.add_argument('--mem-gb', type=float)
    ap.add_argument('--slurm-param', action='append', default=[], metavar='KEY=VALUE')
    ap.add_argument('--wait', action='store_true', help='wait for the job and exit with its outcome')
    return ap.parse_args(argv)


@cli
def main(argv=None):
    args = parse(argv)
    run_argv = list(args.specs) + [x for b in args.binding for x in ('-b', b)] \
        + (['--db', args.db] if args.db else []) + (['--resume', args.resume] if args.resume else [])
    job, folder = submit(args, run_argv)
    print(f'job {job.job_id}: {args.nodes} node(s) x {args.tasks_per_node or args.gpus_per_node or 1} rank(s); '
          f'logs and the run id in {folder}')
    if args.wait:
        job.results()  # one per task; raises when a task failed
        print(f'job {job.job_id} finished: run {(folder / ID_FILE).read_text().strip()}')


if __name__ == '__main__':
    sys.exit(main())
