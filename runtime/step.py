"""The training step the runtime takes, in every precision and every parallel mode (Run.precision, Run.parallel).

TrainStep is an nn.Module whose forward(tokens, mask) runs every objective of the current stage (through whatever
entry point each uses: forward, autoencode, encode) and returns the weighted loss with the per-objective losses and
accuracies. Because the whole step is one module call, DistributedDataParallel's and FSDP's hooks fire around all of
it (runtime/distributed.py wraps it); a single process calls the same module.

Precision: 'fp32' runs as it always has (TF32 matmuls on CUDA); 'bf16' and 'fp16' run the step under torch.autocast
over fp32 parameters, gradients and optimizer state; 'fp16' scales the loss with torch.amp.GradScaler, which skips
an update whose gradients overflowed and lowers the scale. With 'fp32' and 'bf16' the scaler is disabled and every
call on it passes through, so fp32 numerics are exactly those of a step without it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from compiler import objectives as O
from compiler import plan as P
from runtime import train

DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """fp32 on CUDA multiplies matrices in TF32 (tensor cores; ~10 mantissa bits, fp32 range and accumulation);
    the CPU keeps exact fp32."""
    if device.type == 'cuda' and precision == 'fp32':
        torch.set_float32_matmul_precision('high')


def autocast(device: torch.device, precision: str):
    """The context one step's forward runs in: nothing for fp32, else torch.autocast to bf16 / fp16."""
    dtype = DTYPES[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose 5 exponent bits underflow small gradients); disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == 'fp16')


class TrainStep(nn.Module):
    """forward(tokens, mask) -> (weighted loss, {kind: loss}, {kind: accuracy}) of `stage`'s objectives on one
    (micro-)batch, under the run's precision. Holds the model as its only child, so its parameters are the model's
    (named 'model.<name>'); checkpoints and weights files use the model's own names."""

    def __init__(self, model: nn.Module, ids: O.SpecialIds, precision: str = 'fp32'):
        super().__init__()
        self.model, self.ids, self.precision = model, ids, precision
        self.stage: P.Stage | None = None  # set by the trainer at each stage's start

    def forward(self, tokens, mask=None, generator=None):
        with autocast(tokens.device, self.precision):
            return train.stage_loss(self.model, self.stage, tokens, mask, self.ids, generator)


def forward_backward(step: nn.Module, inner: TrainStep, tokens, mask, scaler: torch.amp.GradScaler | None = None,
                     generator=None, sync=None):
    """Forward and backward of one step's batch in micro-batches of Stage.micro_batch rows through `step` (the
    TrainStep itself, or it wrapped by DDP / FSDP; `inner` is the TrainStep). The gradients add up to those of the
    row-weighted mean of the micro-batch losses (the batch loss itself when every row has the same number of
    supervised tokens, as packed data does; ranks average the same way). `sync(enabled)` is a context that turns
    gradient synchronisation off for all but the last micro-batch (runtime.distributed.gradient_sync).
    `mask` may stay on the CPU (the loader's tensor): each micro-batch's padding is decided there and only then moved
    to the tokens' device, so the step reads nothing back from the device.
    Returns detached row-weighted means (loss, {kind: loss}, {kind: accuracy}), without a host sync."""
    stage = inner.stage
    b = tokens.shape[0]
    size = stage.micro_batch or b
    total, losses, accs = 0.0, {}, {}
    for i in range(0, b, size):
        rows = slice(i, i + size)
        part_mask = train.padding(None if mask is None else mask[rows])
        part_mask = None if part_mask is None else part_mask.to(tokens.device, non_blocking=True)
        w = (min(i + size, b) - i) / b
        last = i + size >= b
        with (contextlib.nullcontext() if sync is None else sync(last)), \
                train.compile_report(inner.model, stage, tokens[rows]):
            loss, part_losses, part_accs = step(tokens[rows], part_mask, generator)
            weighted = loss * w
            (weighted if scaler is None else scaler.scale(weighted)).backward()
        total = total + loss.detach() * w
        for k, v in part_losses.items():
            losses[k] = losses.get(k, 0.0) + v.detach() * w
        for k, v in part_accs.items():
            accs[k] = accs.get(k, 0.0) + v * w
    return total, losses, accs


def optimizer_step(opt, sched, scaler: torch.amp.GradScaler, params, max_norm: float = 1.0) -> torch.Tensor:
    """Unscale (fp16), clip to `max_norm`, step, move the schedule on. Returns the gradient norm before clipping
    (non-finite when an fp16 step overflowed: the scaler then skips the update and lowers its scale)."""
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    sched.step()
    return norm.full_tensor() if hasattr(norm, 'full_tensor') else norm  # a DTensor under FSDP


def load_schedule(opt, sched, state: dict) -> None:
    """The schedule's position, and the learning rate it had set on the optimizer (a sharded checkpoint keeps the
    optimizer's tensors only; its hyperparameters come from the plan, its rate from here)."""
    sched.load_state_dict(state)
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):
        group['lr'] = lr


def accumulate(model: nn.Module, stage: P.Stage, tokens, mask, ids: O.SpecialIds, generator=None,
               precision: str = 'fp32'):
    """forward_backward of a plain model in one process (tests and benchmarks: the trainer's own step)."""
    step = TrainStep(model, ids, precision)
    step.stage = stage
    return forward_backward(step, step, tokens, mask, generator=generator)
