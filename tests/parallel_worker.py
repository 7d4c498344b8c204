"""Worker of tests/test_parallel.py: one rank of a CPU (gloo) job that trains a tiny plan's curriculum through the
runtime's own step (runtime/step.py TrainStep, runtime/distributed.py wrapping) on fixed global batches, each rank
taking its contiguous slice, and writes the final full weights (rank 0) to a safetensors file."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from compiler import objectives as O  # noqa: E402
from compiler.model import build  # noqa: E402
from compiler.spec import SPECS_DIR, load  # noqa: E402
from runtime import distributed as D  # noqa: E402
from runtime import sharded  # noqa: E402
from runtime import step as S  # noqa: E402
from runtime.train import optimizer, set_frozen  # noqa: E402

IDS = O.SpecialIds(pad=0, blank=1, copy=2)
# tiny widths; no memory noise (each rank would draw its own); weight decay so that a gradient of zeros where one
# process has none would show
TINY = ['D_MODEL = 32', 'N_HEADS = 2', 'VOCAB = 64', 'CHUNKS = 4', 'CHUNK_LEN = 8', 'Memory.noise = 0.0',
        'Stage.weight_decay = 0.1', 'Data.batch_size = 4']


def plan_of(spec: str, bindings=(), world: int = 1):
    return load([SPECS_DIR / spec], TINY + list(bindings), devices=world).plan


def batch(plan, si: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * si + k)
    b = plan.data.batch_size
    return torch.randint(3, plan.data.vocab_size, (b, plan.memory.chunks, plan.memory.chunk_len), generator=g)


def train(plan, rank: int = 0, world: int = 1, precision: str | None = None, losses_out: list | None = None,
          save_at: tuple[int, int] | None = None, resume: dict | None = None, run_dir: str | None = None):
    """-> the model after the curriculum (one process: world 1). save_at (stage, step): write a sharded checkpoint
    (runtime/sharded.py) to run_dir after that step, its manifest and schedule state to run_dir/resume.json;
    resume: that file's content, to continue from it."""
    device = torch.device('cpu')
    model = build(plan)
    step = S.TrainStep(model, IDS, precision or plan.run.precision)
    D.prepare(step, plan.run, device, os.path.join(ROOT, '.cache/memspec'), world)
    scaler = S.grad_scaler(device, step.precision)
    first = (0, 0) if resume is None else (resume['stage'], resume['step'])
    for si, stage in enumerate(plan.curriculum):
        if si < first[0]:
            continue
        step.stage = stage
        params = set_frozen(model, stage)
        opt, sched = optimizer(params, stage)
        if resume is not None and si == first[0]:
            sharded.load(Path(run_dir), resume['shards'], model, opt)
            S.load_schedule(opt, sched, resume['scheduler'])
        wrapped = D.wrap_stage(step, plan.run.parallel, device, world)
        sync = D.gradient_sync(wrapped)
        for k in range(first[1] if si == first[0] else 0, stage.steps):
            tokens = batch(plan, si, k)
            local = tokens.shape[0] // world
            opt.zero_grad(set_to_none=True)
            loss, _, _ = S.forward_backward(wrapped, step, tokens[rank * local:(rank + 1) * local], None, scaler,
                                            sync=sync)
            S.optimizer_step(opt, sched, scaler, params)
            if losses_out is not None:
                losses_out.append(float(loss))
            if save_at == (si, k + 1):
                manifest = sharded.save(Path(run_dir), model, opt, rank, world)
                if rank == 0:
                    Path(run_dir, 'resume.json').write_text(json.dumps(
                        {'stage': si, 'step': k + 1, 'shards': manifest, 'scheduler': sched.state_dict()}))
    return model


def main(rank: int, world: int, spec: str, bindings: list, out: str, port: int, save_at=None, run_dir=None) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        plan = plan_of(spec, bindings, world)
        model = train(plan, rank, world, save_at=save_at, run_dir=run_dir)
        state = D.full_state(model, world)
        if rank == 0:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, out)
    finally:
        torch.distributed.destroy_process_group()

