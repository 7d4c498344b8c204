"""One curriculum stage: freezing, optimizer and schedule, the objective mixture (the loss of a training step,
compiled under Run.compile; the step itself, micro-batches and precision, is runtime/step.py), evaluation."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
import weakref
from pathlib import Path

import torch

from compiler import objectives as O
from compiler import plan as P
from compiler.attention import xformers_problem
from compiler.families import family
from compiler.model import Graph, parameters_of
from compiler.objective_registry import objective


class Divergence(RuntimeError):
    pass


def set_frozen(model: Graph, stage: P.Stage) -> list[torch.nn.Parameter]:
    """requires_grad per component; returns the trainable parameters. Frozen ones never reach the optimizer,
    so no update, weight decay or momentum can touch them."""
    for p in model.parameters():
        p.requires_grad_(True)
    for comp in (*stage.freeze, *model.pretrained_frozen()):
        for _, p in parameters_of(model, comp):
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def optimizer(params, stage: P.Stage):
    # fused: one kernel over all parameters; on 2 CPU cores it steps ~10x faster than foreach
    # (benchmarks/train_throughput.py)
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay, betas=(0.9, 0.95), fused=True)

    def factor(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        floor = stage.min_lr_ratio
        if stage.decay == 'constant':
            return 1.0
        if stage.decay == 'linear':
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask a graph is given: None when every position is real (packed data), which selects the unmasked
    paths (causal attention without a mask, the encoder's last-block trim). Decided on the loader's CPU tensor,
    before the step: inside it no tensor value is read on the host."""
    return None if mask is None or bool(mask.all()) else mask


def forward(model: Graph, obj: P.Objective, tokens, mask, ids: O.SpecialIds, ablate_memory=False, head=True):
    """-> (logits, labels) for one objective on one batch (head=False: the hidden states the head reads instead of
    logits), through the stack its record names (ObjectiveKind.stack: an objective that regenerates runs the
    family's autoencode_via stack). Copy objectives decode only the supervised half."""
    kind = objective(obj)
    inp, m, labels = O.make_example(obj, tokens, mask, ids)
    if kind.stack == 'regenerate':
        return model.autoencode(inp, m, head=head), labels
    first = kind.first_chunk(tokens.shape[1])
    extra = {'ablate_memory': True} if ablate_memory else {}
    return model(inp, m, first_chunk=first, head=head, **extra), labels[:, first:]


def head_stack(model: Graph, obj: P.Objective):
    """The stack whose head scores an objective's targets."""
    return getattr(model, model.family.autoencode_via) if objective(obj).stack == 'regenerate' else model.decoder


def objective_loss(model: Graph, obj: P.Objective, tokens, mask, ids: O.SpecialIds, generator=None):
    """One objective's mean loss and token accuracy on one batch: the whole forward pass of a training step
    (example, embedding, encoder, memories, decoder, head, cross-entropy). The head runs only on the positions that
    can have a target and never holds the logits of all of them (compiler.objectives.token_loss). Under Run.compile
    this function is the compiled region (compile_step). The objectives whose record names its own loss
    (ObjectiveKind.loss) use that instead (loss_function)."""
    h, labels = forward(model, obj, tokens, mask, ids, head=False)
    keep = O.target_positions(obj)
    return O.token_loss(h[..., keep, :], head_stack(model, obj).head.weight, labels[..., keep])


def loss_function(obj: P.Objective):
    """The loss of one objective, a plain function of (model, objective, tokens, mask, ids, generator) -> (mean loss,
    metric): the record's own loss (ObjectiveKind.loss, always run eagerly) or the head's cross-entropy on the
    example's labels (objective_loss, which stage_loss runs compiled under Run.compile)."""
    kind = objective(obj)
    return objective_loss if kind.loss is None else getattr(O, kind.loss)


# Run.compile: the models whose steps run compiled, and the (stage, objective) steps each has compiled so far
_COMPILED: weakref.WeakKeyDictionary[Graph, set] = weakref.WeakKeyDictionary()  # model -> steps compiled so far
# (stage, objective) graphs of one process: 7 in the frozen-encoder curriculum, and a smaller last micro-batch or a
# padded batch adds one each; above the limit dynamo would silently run the step eagerly
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_objective_loss():
    """The compiled region (built on first use: importing dynamo costs seconds that eager runs need not pay)."""
    return torch.compile(objective_loss, dynamic=False)


def compile_step(model: Graph, cache_dir) -> Graph:
    """Run.compile = True: stage_loss runs each objective's step (objective_loss: example to loss) as one graph,
    compiled on first use per (stage, objective) with static shapes (a stage's steps never recompile) and run
    compiled in forward and backward. The model itself is untouched: parameter names, state dicts and checkpoints
    are those of the eager model. Inductor keeps its compiled kernels in <cache_dir>/inductor (or where
    TORCHINDUCTOR_CACHE_DIR says), so a second run of the same shapes skips most of the compilation."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    chosen = os.environ.get('TORCHINDUCTOR_CACHE_DIR')
    if chosen is None or chosen == os.path.abspath(default_cache_dir()):  # unset, or torch's default filled in
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = str((Path(cache_dir) / 'inductor').resolve())
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # noise (Memory.noise) drawn from torch's own generator, as eager draws it: compiled and eager runs, and a
    # resume, follow the same trajectory
    torch._inductor.config.fallback_random = True
    _COMPILED.setdefault(model, set())
    return model


def compiled(model: Graph) -> bool:
    return model in _COMPILED


def inductor_cache_counts() -> tuple[int, int]:
    """(hits, misses) of inductor's FX graph cache in this process so far."""
    from torch._dynamo.utils import counters
    return counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss']


@contextlib.contextmanager
def compile_report(model: Graph, stage: P.Stage, tokens):
    """Around one forward and backward: when it compiled new steps, say in the run's log what, how long it took
    (the whole first step: tracing, forward and backward compilation, one run) and how much the inductor cache
    served (0 hits: a cold compile)."""
    seen = _COMPILED.get(model)
    if seen is None:
        yield
        return
    before, counts, t0 = set(seen), inductor_cache_counts(), time.perf_counter()
    yield
    order = {o: i for i, o in enumerate(stage.objectives)}
    new = sorted(seen - before, key=lambda key: order.get(key[1], len(order)))  # the stage's order, not a set's
    if new:
        hits, misses = (a - b for a, b in zip(inductor_cache_counts(), counts))
        print(f"Run.compile: stage {stage.name}, {', '.join(key[1].kind for key in new)} on {tuple(tokens.shape)}: "
              f'compiled in {time.perf_counter() - t0:.1f} s (first step included; inductor cache '
              f"{os.environ['TORCHINDUCTOR_CACHE_DIR']}: {hits} hits, {misses} misses)", file=sys.stderr, flush=True)


def stage_loss(model: Graph, stage: P.Stage, tokens, mask, ids: O.SpecialIds, generator=None):
    """The stage's objective mixture on one batch. Returns (total loss, {kind: loss}, {kind: accuracy}), all
    tensors: nothing is read on the host (non-finite losses are caught by DivergenceWatch)."""
    losses, accs = {}, {}
    for obj in stage.objectives:
        loss_fn = loss_function(obj)
        if loss_fn is objective_loss and compiled(model):
            if tokens.is_cuda:  # the attention backend's probe runs eagerly, before tracing (it is not traceable)
                xformers_problem(tokens.device)
            # what a new graph is compiled for: trainable parameters, objective, shapes, mask, grad mode
            _COMPILED[model].add((stage.name, obj, tuple(tokens.shape), mask is None, torch.is_grad_enabled()))
            loss_fn = _compiled_objective_loss()
            losses[obj.kind], accs[obj.kind] = loss_fn(model, obj, tokens, mask, ids)  # as traced: no generator
        else:
            losses[obj.kind], accs[obj.kind] = loss_fn(model, obj, tokens, mask, ids, generator)
    return O.combine(losses, stage), losses, accs


class DivergenceWatch:
    """Non-finite losses, watched without a host sync per step: `add` folds each step's losses into tensors, and
    `check` reads them on the host; the trainer checks where it reads the host anyway (log steps) and before it
    evaluates or writes anything, so a diverged state is never persisted. Raises Divergence with the losses of the
    first non-finite step."""

    def __init__(self, stage: P.Stage):
        self.stage, self.names, self.values, self.bad = stage, None, None, None

    def add(self, total: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        values = torch.stack([total.detach().float(), *(v.detach().float() for v in losses.values())])
        bad = ~torch.isfinite(values[0])
        if self.values is None:
            self.names, self.values, self.bad = list(losses), values, bad
        else:  # keep the first non-finite step's losses
            self.values = torch.where(self.bad, self.values, values)
            self.bad = self.bad | bad

    def check(self) -> None:
        if self.bad is None or not bool(self.bad):
            return
        total, *parts = self.values.tolist()
        raise Divergence(f'loss became {total} ({dict(zip(self.names, parts))}); '
                         f'lower Stage.lr (now {self.stage.lr}) or add warmup')


def eval_objective(plan: P.Plan, kind: str, stage: P.Stage | None = None) -> P.Objective:
    """The objective a stage end scores for `kind`: as `stage` binds it (its delimiter: the paper's Copy Eval is blank
    copy with the 3 delimiter tokens its combined stage trains with; retrieval's temperature and query), else as the
    curriculum last binds it, else the defaults. Weight 1: a weight changes no metric."""
    bound = [o for o in (stage.objectives if stage is not None else ()) if o.kind == kind] or \
        [o for s in reversed(plan.curriculum) for o in s.objectives if o.kind == kind]
    return dataclasses.replace(bound[0], weight=1.0) if bound else P.Objective(kind=kind)


@torch.no_grad()
def evaluate(model: Graph, plan: P.Plan, val, val_mask, ids: O.SpecialIds, batch_size: int, max_batches: int,
             bytes_per_token: float | None, vocab: int, progress=None,
             stage: P.Stage | None = None) -> dict[str, float]:
    """Held-out metrics per objective of the family's evaluation suite (Family.eval_suite): ce, token_accuracy,
    normalized_hamming, info_proportion (+ bits_per_byte where the record says its targets are all of the text).
    Copy objectives are scored on full-length sequences only (no padding), as the paper does. What the record asks
    for besides (compiler/objective_registry.py), where the family can ablate (Family.ablation): the same metrics with
    every memory replaced by the pad slot ('<kind>_ablated': the same decoder without memory information, the in-run
    no-memory control; copy with tokens visible is mostly next-token prediction at short chunks, so what memories add
    to it is copy minus copy_ablated); ce per chunk index ('<kind>.ce.chunk<c>'); a copy's needle form
    (ObjectiveKind.needle, needle_rows). Each kind is scored as `stage` binds it (eval_objective). `progress(rows)` is
    called after every batch (a progress bar's update)."""
    was = model.training
    model.eval()
    out = {}
    fam = family(plan)
    full = val_mask.flatten(1).all(-1)
    for obj in (eval_objective(plan, k, stage) for k in fam.eval_suite(plan)):
        kind = objective(obj)
        x, m = (val[full], val_mask[full]) if kind.copies else (val, val_mask)
        x, m = x[:batch_size * max_batches], m[:batch_size * max_batches]
        forms = [(obj.kind, x)] + ([(kind.needle, needle_rows(x))] if kind.needle else [])
        for name, rows in forms:
            for suffix, ablate in [('', False)] + ([('_ablated', True)] if kind.ablated_twin() and fam.ablation
                                                   else []):
                total, chunks = _tally(model, obj, rows, m, ids, batch_size, ablate, progress)
                if name != obj.kind:  # the needle: the first copied chunk only
                    total, chunks = chunks[0], []
                bpt = bytes_per_token if kind.bits_per_byte and name == obj.kind else None
                for k, v in total.metrics(vocab, bpt).items():
                    out[f'{name}{suffix}.{k}'] = v
                if kind.per_chunk:
                    out.update({f'{name}{suffix}.ce.chunk{c}': t.nll / t.tokens for c, t in enumerate(chunks)
                                if t.tokens})
    model.train(was)
    return out


def needle_rows(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Held-out rows [E, N, L] with chunk 0 replaced by tokens drawn at random (seeded) from the rows' own tokens: a
    key with the text's token frequencies that no language model can predict from its context. A copy of these rows
    asks for the key one copy distance later; chance is the unigram accuracy."""
    g = torch.Generator().manual_seed(seed)
    pool = x.reshape(-1)
    out = x.clone()
    out[:, 0] = pool[torch.randint(len(pool), out[:, 0].shape, generator=g)]
    return out


def _tally(model: Graph, obj: P.Objective, x, m, ids: O.SpecialIds, batch_size: int, ablate: bool, progress):
    """Decoding metrics of one objective over held-out rows `x` (key masks `m`), batch by batch: (all targets, one
    Tally per chunk the objective scores)."""
    device = next(model.parameters()).device  # Run.device: the held-out set stays on the CPU, batches move
    tally, chunks = O.Tally(), []
    for i in range(0, len(x), batch_size):
        pad = padding(m[i:i + batch_size])  # decided on the CPU tensor: no host read on the device
        logits, labels = forward(model, obj, x[i:i + batch_size].to(device),
                                 None if pad is None else pad.to(device), ids, ablate)
        tally.add(logits, labels)
        chunks = chunks or [O.Tally() for _ in range(labels.shape[1])]
        for c, t in enumerate(chunks):
            t.add(logits[:, c], labels[:, c])
        if progress is not None:
            progress(len(labels))
    return tally, chunks
