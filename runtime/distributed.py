"""torchrun support: the process group, gradient averaging, and a stand-in for Sacred's run on ranks > 0."""
from __future__ import annotations

import os

import torch


class NullRun:
    """Stands in for Sacred's run on ranks > 0 of a distributed job: only rank 0 records and writes."""
    _id = None

    def __init__(self):
        self.info = {}

    def log_scalar(self, *args):
        pass


def distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, NCCL on GPU); (0, 1) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
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
