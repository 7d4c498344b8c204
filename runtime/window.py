"""Forward readings (runtime/reading.py): generation and scoring without a KV cache, through the trained forward pass.

Families and decoders that keep no KV cache (masked-mixer decoders, the recurrent memory transformer, the oracle)
read text exactly as training lays out an example: chunks of L tokens from the start of the text, N chunks in the
window, the last one right-padded (key mask). Text longer than the window keeps its newest whole chunks, so chunk
boundaries stay where they were; families that read one sequence (clm, full_context) keep the newest N*L tokens.
Window position t scores the token at t+1 (compiler/objectives.py's labels; the last position of a chunk is the
one training never supervised, as in runtime/decoding.py). Each new token runs the whole window again: slower than a
cache, and the numbers are the trained graph's exactly.
"""
from __future__ import annotations

from typing import Callable

import torch

from runtime.reading import Reading
from runtime.sampling import Generation, Scored, clock, record, sample, scored


def _one_sequence(model) -> bool:
    return model.family.generation == 'causal'


def fit(model, row: list[int]) -> list[int]:
    """The tokens of `row` the window reads: the newest whole chunks (or, one-sequence families, tokens)."""
    if _one_sequence(model):
        return row[-model.n * model.l:]
    return row[dropped(model, row) * model.l:]


def dropped(model, row: list[int]) -> int:
    """Chunks at the start of `row` beyond the window (0 for one-sequence families, which drop tokens)."""
    return 0 if _one_sequence(model) else max(0, -(-len(row) // model.l) - model.n)


def hidden(model, rows: list[list[int]], how: Reading, device) -> torch.Tensor:
    """Final-normed hidden states [B, N*L, d] of rows (each at most N*L tokens) laid out as one example each."""
    n, l = model.n, model.l
    tokens = torch.zeros(len(rows), n * l, dtype=torch.long)
    mask = torch.zeros(len(rows), n * l, dtype=torch.bool)
    for j, r in enumerate(rows):
        tokens[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = True
    km = None if bool(mask.all()) else mask.view(-1, n, l).to(device)
    extra = {'ablate_memory': True} if how.mode == 'ablated' else {}
    h = model(tokens.view(-1, n, l).to(device), km, head=False, **extra)
    return h.reshape(len(rows), n * l, -1)


@torch.inference_mode()
def generate(model, rows: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None,
             eod: int | None, generator, how: Reading, stop: Callable[[list[int]], bool] | None,
             device) -> Generation:
    """runtime.decoding.generate for forward readings: each step runs the window of every unfinished row."""
    out: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    t0 = t1 = clock(device)
    n = 0
    while n < max_new_tokens and not all(done):
        live = [i for i in range(len(rows)) if not done[i]]
        reads = [fit(model, list(rows[i]) + out[i]) for i in live]
        h = hidden(model, reads, how, device)
        last = h[torch.arange(len(reads)), torch.tensor([len(r) - 1 for r in reads])]
        record(live, sample(model.decoder.head(last), temperature, top_k, generator), out, done, eod, stop)
        n += 1
        if n == 1:
            t1 = clock(device)
    return Generation(out, t1 - t0, clock(device) - t1, max(0, n - 1), 0, [dropped(model, r) for r in rows])


def _pieces(model, contexts, continuations) -> list[tuple[int, list[int], int]]:
    """(request, the tokens the window reads, how many of its last tokens are scored): a continuation that does not
    fit the window after its context is scored in pieces, each read with the newest tokens before it."""
    span = model.n * model.l // 2 if _one_sequence(model) else (model.n - 1) * model.l  # keeps >= 1 token before
    out = []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        full = list(ctx) + list(cont)
        step = len(cont) if len(fit(model, full)) == len(full) else max(1, span)
        for s in range(0, len(cont), step):
            end = len(ctx) + min(s + step, len(cont))
            out.append((i, fit(model, full[:end]), end - len(ctx) - s))
    return out


@torch.inference_mode()
def score(model, contexts, continuations, how: Reading, batch_size: int, device) -> list[Scored]:
    """runtime.scoring.score for forward readings: teacher-forced, one window per (piece of a) request."""
    pieces = _pieces(model, contexts, continuations)
    out = [Scored([], []) for _ in contexts]
    for b in range(0, len(pieces), batch_size):
        part = pieces[b:b + batch_size]
        h = hidden(model, [r for _, r, _ in part], how, device)
        for j, (i, row, k) in enumerate(part):
            got = scored(model.decoder.head(h[j, len(row) - 1 - k:len(row) - 1]), row[-k:])
            out[i].logprobs += got.logprobs
            out[i].greedy += got.greedy
    return out
