"""Objectives: how a batch becomes (model input, labels), the losses, and the one place metrics are computed. What
each objective kind is (which function here builds its example, which positions are targets, which loss) is its
record in compiler/objective_registry.py.

Label convention (golden-tested): labels[b, c, t] is the target of logits[b, c, t]; IGNORE marks positions
without a target. Causal objectives predict the next token *inside* the chunk (the paper's memory-model loss:
chunk c sees only memories + its own tokens, so its first token has no prediction); the full-context and
clm families use the same label set so their losses are comparable. Nothing mutates its inputs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from compiler import plan as P
from compiler.objective_registry import faithful_parts, objective
from compiler.queries import queries

IGNORE = -100


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    blank: int
    copy: int


def shifted_labels(tokens: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Next token inside each chunk: labels[..., t] = tokens[..., t+1]; the last position and padding IGNORE."""
    labels = torch.full_like(tokens, IGNORE)
    labels[..., :-1] = tokens[..., 1:]
    if key_mask is not None:
        valid = key_mask[..., 1:] & key_mask[..., :-1]
        labels[..., :-1] = torch.where(valid, labels[..., :-1], IGNORE)
    return labels


# The example builders by name (ObjectiveKind.example names one): functions of (objective, tokens, key mask, ids) ->
# (inputs, input key mask, labels). A plain dict: the compiled step (Run.compile) traces a lookup in it
EXAMPLES: dict[str, Callable] = {}


def example(fn: Callable) -> Callable:
    """Registers an example builder under its function name."""
    EXAMPLES[fn.__name__] = fn
    return fn


def make_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """-> (input tokens, input key mask, labels), built by the function its record names
    (ObjectiveKind.example). Inputs are never modified in place."""
    return EXAMPLES[objective(obj).example](obj, tokens, key_mask, ids)


@example
def next_token_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """The chunks as they are; the next token inside each chunk is the target."""
    return tokens, key_mask, shifted_labels(tokens, key_mask)


@example
def autoencode_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """The chunks as they are; every real token is its own target."""
    labels = tokens if key_mask is None else torch.where(key_mask, tokens, IGNORE)
    return tokens, key_mask, labels


@example
def copy_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """Input = [first half, first half]; only the second half is supervised, with the next-token targets of the
    first half (the tokens to predict are visible in the first half)."""
    return _copy(obj, tokens, key_mask, ids, blank=False)


@example
def blank_copy_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """Input = [first half, blank tokens]; only the second half is supervised, with the next-token targets of the
    first half (recall from memories alone)."""
    return _copy(obj, tokens, key_mask, ids, blank=True)


@example
def random_copy_example(obj: P.Objective, tokens, key_mask, ids: SpecialIds):
    """copy_example of a first half whose tokens are the batch's own first-half tokens in a fixed scrambled order
    (across rows and positions): text with its token frequencies but no sequence a language model can continue, so
    with the tokens visible the next one still comes only from the memories."""
    h = tokens.shape[1] // 2
    perm = _scramble(tokens[:, :h].numel(), tokens.device)
    scrambled = tokens.clone()
    scrambled[:, :h] = tokens[:, :h].reshape(-1)[perm].reshape(tokens[:, :h].shape)
    mask = None
    if key_mask is not None:  # padding moves with its slot, so padded slots stay unsupervised
        mask = key_mask.clone()
        mask[:, :h] = key_mask[:, :h].reshape(-1)[perm].reshape(key_mask[:, :h].shape)
    return _copy(obj, scrambled, mask, ids, blank=False)


@functools.cache
def _scramble_cpu(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))


def _scramble(n: int, device) -> torch.Tensor:
    """A fixed permutation of n positions (seeded by n: deterministic, the same on resume and under compile)."""
    return _scramble_cpu(n).to(device)


def _copy(obj: P.Objective, tokens, key_mask, ids: SpecialIds, blank: bool):
    h = tokens.shape[1] // 2
    first = tokens[:, :h]
    first_mask = None if key_mask is None else key_mask[:, :h]
    mask = None if key_mask is None else torch.cat([first_mask, first_mask], 1)
    second = torch.full_like(first, ids.blank) if blank else first
    if first_mask is not None and blank:
        second = torch.where(first_mask, second, ids.pad)
    if obj.delimiter:
        second = second.clone()
        second[:, 0, :obj.delimiter] = ids.copy  # the research code's copy delimiter tokens
    inputs = torch.cat([first, second], 1)
    labels = torch.full_like(inputs, IGNORE)
    labels[:, h:] = shifted_labels(first, first_mask)
    if obj.delimiter:  # labels around the delimiter are ignored
        labels[:, h, :obj.delimiter] = IGNORE
    return inputs, mask, labels


# Logits held at once by head_cross_entropy: 2**24 fp32 values (64 MiB), 2048 rows at vocabulary 8192. Smaller tiles
# were slower on 2 CPU cores (1024 rows: 0.87-1.07x the unfused head, 2048: 0.92-1.20x, measured): the weight
# gradient's matrix product has a tile's rows as its inner dimension
HEAD_TILE = 2 ** 24


class _HeadCrossEntropy(torch.autograd.Function):
    """Head + cross-entropy over row tiles: the fp32 logits of `tile` rows exist at a time, never those of all rows.

    The loss is a sum, so its gradient with respect to the logits is known in the forward pass (softmax minus
    one-hot, times the one scalar that reaches backward): each tile's input and weight gradients are computed while
    its logits are at hand, and backward only scales them. That costs the three head matmuls of an unfused head
    (logits, input gradient, weight gradient), where an online logsumexp over vocabulary chunks would have to
    recompute every tile's logits for the weight gradient (a fourth): the softmax normaliser of a row is known only
    after its last vocabulary chunk."""

    @staticmethod
    def forward(ctx, h, weight, labels, tile: int, grad_h: bool, grad_w: bool):
        nll, preds, dh, dw = [], [], [], None
        for r in range(0, h.shape[0], tile):
            x, y = h[r:r + tile], labels[r:r + tile]
            z = x @ weight.T
            z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16 logits (autocast) are reduced in fp32
            valid = y != IGNORE
            target = y.clamp(min=0)[:, None]
            picked = z.gather(1, target)[:, 0]
            top, pred = z.max(-1)
            p = z.sub_(top[:, None]).exp_()  # in place: the tile's logits are needed no more
            total = p.sum(-1)
            nll.append(torch.where(valid, top + total.log() - picked, 0.0).sum())
            preds.append(pred)
            if grad_h or grad_w:
                # d(sum of nll)/d logits = softmax - onehot on rows with a target, 0 elsewhere
                live = valid.to(p.dtype)[:, None]
                g = p.mul_(live / total[:, None]).scatter_add_(1, target, -live).to(x.dtype)
                if grad_h:
                    dh.append(g @ weight)
                if grad_w:
                    part = (g.T @ x).to(z.dtype)
                    dw = part if dw is None else dw.add_(part)
        ctx.save_for_backward(torch.cat(dh) if grad_h else None, dw)
        ctx.dtypes = h.dtype, weight.dtype
        pred = torch.cat(preds)
        ctx.mark_non_differentiable(pred)
        return torch.stack(nll).sum(), pred

    @staticmethod
    def backward(ctx, g_nll, _g_pred):
        dh, dw = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if dh is None else (dh * g_nll).to(h_dtype), None if dw is None else (dw * g_nll).to(w_dtype),
                None, None, None, None)


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tile: int | None = None):
    """Sum of the cross-entropies of the head's logits `h @ weight.T` at the rows whose label is not IGNORE, and the
    argmax of every row: h [..., d], weight [vocab, d], labels [...] -> (scalar fp32 sum, argmax [...]).
    Equal to F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction='sum') and logits.argmax(-1)
    (tests/test_objectives.py), without the logits of all rows: `tile` rows at a time (default HEAD_TILE logits)."""
    d = h.shape[-1]
    tile = tile or max(1, HEAD_TILE // weight.shape[0])
    grad = torch.is_grad_enabled()
    nll, pred = _HeadCrossEntropy.apply(h.reshape(-1, d), weight, labels.reshape(-1), tile,
                                        grad and h.requires_grad, grad and weight.requires_grad)
    return nll, pred.view(labels.shape)


def target_positions(obj: P.Objective) -> slice:
    """The positions of a chunk that can have a target (ObjectiveKind.targets): every one where a token predicts
    itself, all but the last for the next-token objectives (shifted_labels), so the head need not run there."""
    return objective(obj).target_positions()


def token_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Mean cross-entropy over the positions with a target, and the token accuracy there (no host sync: a batch
    without targets gives 0, not NaN). h [..., d] are the hidden states the head reads, labels [...]."""
    nll, pred = head_cross_entropy(h, weight, labels)
    valid = labels != IGNORE
    count = valid.sum().clamp(min=1)
    return nll / count, ((pred == labels) & valid).sum() / count


def retrieval_loss(model, obj: P.Objective, tokens, key_mask, ids: SpecialIds, generator=None):
    """InfoNCE: query = encoder embedding of a random n-gram (or n random tokens) of each document's first chunk,
    candidates = the embeddings of every document's first chunk in the batch. Returns (loss, top-1 accuracy)."""
    b, _, l = tokens.shape
    doc = tokens[:, 0]
    real = l if key_mask is None else int(key_mask[:, 0].sum(-1).min())
    q_tokens, q_mask = queries(doc, real, obj.ngram, obj.query, ids.pad, generator)
    q = F.normalize(model.encode(q_tokens.to(doc.device), q_mask.to(doc.device)), dim=-1)
    c = F.normalize(model.encode(doc, None if key_mask is None else key_mask[:, 0]), dim=-1)
    sim = q @ c.T / obj.temperature
    target = torch.arange(b, device=sim.device)
    return F.cross_entropy(sim, target), (sim.argmax(-1) == target).float().mean()


def combine(losses: dict[str, torch.Tensor], stage: P.Stage) -> torch.Tensor:
    """Explicit normalization: weighted_sum = sum_i w_i * mean_i. 'faithful' reproduces the research code's
    accident, clm_mean + 0.5 * copy_mean, whatever the weights say."""
    if stage.normalize == 'faithful':
        clm, copy = faithful_parts(losses)
        return losses[clm] + 0.5 * losses[copy]
    return sum(o.weight * losses[o.kind] for o in stage.objectives)


@dataclass
class Tally:
    """Accumulates decoding metrics over batches (plain sums; no in-place edits of batches)."""
    nll: float = 0.0
    correct: int = 0
    tokens: int = 0
    hamming_sum: float = 0.0
    samples: int = 0

    def add(self, logits, labels):
        valid = labels != IGNORE
        if not valid.any():
            return
        lp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE, reduction='sum')
        hit = (logits.argmax(-1) == labels) & valid
        self.nll += float(lp)
        self.correct += int(hit.sum())
        self.tokens += int(valid.sum())
        per_sample = valid.flatten(1).sum(-1)
        has = per_sample > 0
        acc = hit.flatten(1).sum(-1)[has].float() / per_sample[has]
        self.hamming_sum += float((1 - acc).sum())
        self.samples += int(has.sum())

    def metrics(self, vocab: int, bytes_per_token: float | None = None) -> dict[str, float]:
        if not self.tokens:
            return {}
        ce = self.nll / self.tokens
        out = {'ce': ce, 'token_accuracy': self.correct / self.tokens,
               'normalized_hamming': self.hamming_sum / self.samples,
               # I_e against an informationless model: H0 = ln(vocab) (uniform), docs/science.md: metrics
               'info_proportion': 1 - ce / math.log(vocab)}
        if bytes_per_token:
            out['bits_per_byte'] = ce / math.log(2) / bytes_per_token
        return out


def floors(train: torch.Tensor, train_mask: torch.Tensor, val: torch.Tensor, val_mask: torch.Tensor, vocab: int,
           prior: float = 10.0) -> dict[str, dict[str, dict[str, float]]]:
    """What token statistics of the training split alone achieve on the held-out targets: cross-entropy and token
    accuracy of a unigram model (add-one smoothed) and of a bigram model that reads the previous token of the same
    chunk (p(b|a) = (c(a, b) + prior * p(b)) / (c(a) + prior): counts shrunk toward the unigram). Examples are
    [E, N, L] with key masks. For two target sets:
    - 'clm': the next token inside a chunk (the memory models' clm, copy and blank-copy targets);
    - 'autoencode': every real token (a reconstruction from memory). Its unigram row is the floor of an
      informationless probe; its bigram row is given the true previous token, a reference for what knowing the
      sequence buys, not a floor a probe can reach (the first token of a chunk falls back to the unigram).
    -> {'clm': {'unigram': {'ce', 'token_accuracy'}, 'bigram': {...}}, 'autoencode': {...}}."""
    def pairs(x, m):
        a, b = x[..., :-1].reshape(-1), x[..., 1:].reshape(-1)
        ok = (m[..., :-1] & m[..., 1:]).reshape(-1)
        return a[ok], b[ok]

    uni = torch.bincount(train[train_mask.bool()].reshape(-1), minlength=vocab).double() + 1
    p_uni = uni / uni.sum()
    a, b = pairs(train, train_mask.bool())
    codes, counts = torch.unique(a * vocab + b, return_counts=True)
    row = torch.bincount(a, minlength=vocab).double()
    # the bigram's best guess per previous token: the best observed pair, unless the unigram's favourite (with no pair
    # count) scores higher
    score = counts.double() + prior * p_uni[codes % vocab]
    best = torch.full((vocab,), prior * float(p_uni.max()), dtype=torch.double)
    best = best.scatter_reduce(0, codes // vocab, score, 'amax')
    guess = torch.full((vocab,), int(p_uni.argmax()), dtype=torch.long)
    top = score >= best[codes // vocab]
    guess[codes[top] // vocab] = codes[top] % vocab

    def bigram(prev, nxt):
        idx = torch.searchsorted(codes, prev * vocab + nxt).clamp(max=len(codes) - 1)
        c = torch.where(codes[idx] == prev * vocab + nxt, counts[idx].double(), 0.0)
        p = (c + prior * p_uni[nxt]) / (row[prev] + prior)
        return {'ce': float(-p.log().mean()), 'token_accuracy': float((guess[prev] == nxt).double().mean())}

    def unigram(targets):
        return {'ce': float(-p_uni[targets].log().mean()),
                'token_accuracy': float((targets == p_uni.argmax()).double().mean())}

    vm = val_mask.bool()
    va, vb = pairs(val, vm)
    every = val[vm].reshape(-1)
    first = vm.clone()
    first[..., 1:] &= ~vm[..., :-1]  # a chunk's first real token: no previous token inside the chunk
    firsts = val[first]
    n_first, n_pairs = len(firsts), len(vb)
    ae_bigram = bigram(va, vb)
    ae_first = unigram(firsts) if n_first else {'ce': 0.0, 'token_accuracy': 0.0}
    mix = {k: (ae_bigram[k] * n_pairs + ae_first[k] * n_first) / max(n_pairs + n_first, 1) for k in ae_bigram}
    return {'clm': {'unigram': unigram(vb), 'bigram': bigram(va, vb)},
            'autoencode': {'unigram': unigram(every), 'bigram': mix}}
