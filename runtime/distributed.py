"""torchrun support: the process group, gradient averaging, and a stand-in for Sacred's run on ranks > 0."""
from __future__ import annotations

import os

import torch

from compiler.errors import UserError


class NullRun:
    """Stands in for Sacred's run on ranks > 0 of a distributed job: only rank 0 records and writes."""
    _id = None

    def __init__(self):
        self.info = {}

    def log_scalar(self, *args):
        pass


def run_device(run, where: str = 'Run.device') -> torch.device:
    """The device Run.device names for this process: 'cpu'; 'cuda' (under torchrun this process's GPU, LOCAL_RANK;
    a UserError at `where` when CUDA is not available: no silent fallback); 'auto': CUDA when available, else CPU."""
    if run.device == 'cpu' or (run.device == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError(where, f"Run.device = 'cuda' but CUDA is not available here (torch {torch.__version__}"
                        f"{', built without CUDA' if torch.version.cuda is None else ', no usable GPU'})",
                        "use Run.device = 'auto' (CUDA when available, else CPU) or 'cpu'")
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    return device


def distributed(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world) under torchrun (NCCL when training on CUDA, gloo otherwise); (0, 1) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = device.type == 'cuda' if device is not None else torch.cuda.is_available()
        torch.distributed.init_process_group('nccl' if cuda else 'gloo')
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks in one flat buffer. Used instead of DistributedDataParallel because the
    objectives call several entry points of the model (forward, autoencode, encode), not just forward."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
