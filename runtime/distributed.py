"""Several processes (torchrun, submitit): the process group, and the train step wrapped for Run.parallel.

Run.parallel = 'ddp': the TrainStep (runtime/step.py) in DistributedDataParallel; 'fsdp': FSDP2 (fully_shard) with
every block of every stack one shard unit, every stack's token embedding one (so a frozen component is a unit of its
own, or a set of them, which never reduces gradients), and the TrainStep the root unit holding the rest (norms, heads,
memory module: parts the objectives read outside a forward call, like the head's weight in the fused head loss).
Optional activation checkpointing per block (Run.activation_checkpointing). The order is torchtitan's: checkpointing,
then compilation (Run.compile, runtime.train.compile_step), then sharding.

Gradient accumulation synchronises gradients only on a step's last micro-batch (gradient_sync). Gradients are
averaged over ranks; on gloo (CPU) FSDP reduces with SUM and divides afterwards, since gloo's AVG sums.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn as nn

from compiler.blocks import Stack
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
    """(rank, world) under torchrun or a submitit job (NCCL when training on CUDA, gloo otherwise); (0, 1)
    otherwise."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = device.type == 'cuda' if device is not None else torch.cuda.is_available()
        torch.distributed.init_process_group('nccl' if cuda else 'gloo')
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


class RankLost(KeyboardInterrupt):
    """Another rank of the job died (killed, out of memory, node lost): a collective failed here. The run stops
    like an interrupted one (recorded INTERRUPTED) and resumes from its last checkpoint, at any world size."""


# what gloo's transport says when the peer of a collective is gone (NCCL raises DistBackendError)
_PEER_GONE = ('Connection reset by peer', 'Connection closed by peer', 'gloo/transport')


def lost_rank(e: BaseException) -> bool:
    return isinstance(e, torch.distributed.DistError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_GONE))


def check_parallel(parallel: str, world: int, where: str) -> None:
    """Run.parallel = 'none' trains one process: several would each train alone, unsynchronised."""
    if parallel == 'none' and world > 1:
        raise UserError(where, f"Run.parallel = 'none' but this job has {world} processes (WORLD_SIZE)",
                        "bind Run.parallel = 'ddp' (or 'fsdp' to shard the model) for a multi-process job, or start "
                        'one process')


def blocks(model: nn.Module) -> list[nn.Module]:
    """Every block of every stack of the model, in module order."""
    return [layer for m in model.modules() if isinstance(m, Stack) for layer in m.layers]


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block: each block's forward runs under torch.utils.checkpoint (non-reentrant,
    so it composes with torch.compile and FSDP), keeping only its input for backward. Set on the block instances'
    forward rather than by wrapping them in a module, so parameter names, state dicts and checkpoints stay the same."""
    for block in blocks(model):
        block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block))


def shard(step: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 over the TrainStep: a unit per block and per stack embedding, the step itself the root."""
    from torch.distributed.fsdp import fully_shard
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = blocks(step) + [m.embedding for m in step.modules()
                            if isinstance(m, Stack) and isinstance(getattr(m, 'embedding', None), nn.Module)]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(step, mesh=mesh)
    if torch.distributed.get_backend() == 'gloo':  # gloo's AVG sums: reduce with SUM, divide by the world after
        for m in step.modules():
            if hasattr(m, 'set_force_sum_reduction_for_comms'):
                m.set_force_sum_reduction_for_comms(True)
    return step


def prepare(step: nn.Module, run, device: torch.device, cache_dir, world: int = 1) -> nn.Module:
    """Checkpointing, then compilation, then (fsdp, several processes) sharding, in that order; once per run. DDP
    wraps per stage (wrap_stage), since it buckets the gradients of the parameters trainable when it is built."""
    from runtime.train import compile_step
    if run.activation_checkpointing:
        checkpoint_blocks(step.model)
    if run.compile:
        compile_step(step.model, cache_dir)
    if run.parallel == 'fsdp' and world > 1:
        shard(step, device)
    return step


def wrap_stage(step: nn.Module, parallel: str, device: torch.device, world: int = 1) -> nn.Module:
    """The module a stage's training calls: DDP over the step, built after the stage froze its components
    (find_unused_parameters: a stage's objectives need not reach every trainable parameter, e.g. the autoencoder
    decoder in a clm stage; those keep no gradient, as in one process); the (sharded) step itself otherwise."""
    if parallel != 'ddp' or world == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == 'cuda' else None,
                                   find_unused_parameters=True)


def gradient_sync(module: nn.Module):
    """sync(enabled) -> a context: gradients of a micro-batch are reduced over ranks only when `enabled` (the
    step's last micro-batch); the others accumulate locally (DDP no_sync, FSDP set_requires_gradient_sync)."""
    @contextlib.contextmanager
    def sync(enabled: bool):
        if enabled:
            yield
        elif hasattr(module, 'no_sync'):
            with module.no_sync():
                yield
        elif hasattr(module, 'set_requires_gradient_sync'):
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        else:
            yield
    return sync


@contextlib.contextmanager
def gathered(step: nn.Module):
    """The root unit's parameters gathered (FSDP) while evaluation calls the model's entry points directly (the
    blocks' and embeddings' units gather themselves in their forward); nothing to do otherwise. Every rank must
    enter it together."""
    if not hasattr(step, 'unshard'):
        yield
        return
    step.unshard()
    try:
        yield
    finally:
        step.reshard()


def full_state(model: nn.Module, world: int) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on the CPU (a collective under FSDP: every rank calls it; rank 0 gets the
    tensors, the others None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if world == 1 or not any(hasattr(p, 'full_tensor') for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} \
            if world == 1 or torch.distributed.get_rank() == 0 else None
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if torch.distributed.get_rank() == 0 else None


def global_mean(values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Means over ranks of per-rank scalars (what a single process with the global batch would log)."""
    flat = torch.stack([v.detach().float() for v in values.values()])
    if world > 1:
        torch.distributed.all_reduce(flat)
        flat /= world
    return dict(zip(values, flat.tolist()))
