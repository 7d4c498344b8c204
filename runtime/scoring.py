"""Teacher-forced scoring of continuations (what lm-eval's loglikelihood requests need), read exactly as generation
reads text: cached readings through runtime/decoding.py, forward readings through runtime/window.py."""
from __future__ import annotations

import torch

from runtime import decoding as D
from runtime import reading as R
from runtime import window
from runtime.reading import MemoryCache, Reading
from runtime.sampling import Scored, scored


@torch.inference_mode()
def score(model, contexts: list[list[int]], continuations: list[list[int]], mode: str | Reading = 'on',
          memory_cache: MemoryCache | None = None, batch_size: int = 32, device=None) -> list[Scored]:
    """Teacher-forced log-likelihood of each continuation after its context, read exactly as generation reads it:
    the context is prefilled (memory models: complete chunks -> memories), the continuation fed with step()'s
    semantics (a chunk that fills up becomes a memory). Causal readings left-truncate context + continuation to
    the window (the token before the continuation stays); a continuation longer than the window is scored in
    pieces of half a window, each after the tokens before it that fit (the harness' rolling windows)."""
    model.eval()
    device = device or next(model.parameters()).device
    how = R.how(model, mode)
    if any(not ctx or not cont for ctx, cont in zip(contexts, continuations)):
        raise ValueError('score() needs a context and a continuation of at least one token each')
    if how.forward:
        return window.score(model, contexts, continuations, how, batch_size, device)
    if how.causal:
        return _score_window(model, how, contexts, continuations, memory_cache, batch_size, device)
    out: list[Scored | None] = [None] * len(contexts)
    for g in D.groups(model, [list(c) for c in contexts], how, device, batch_size):
        width = max(len(continuations[i]) for i in g.rows)
        cont = torch.zeros(len(g.rows), width, dtype=torch.long, device=device)
        for j, i in enumerate(g.rows):  # right padding: what follows a row's continuation cannot change its scores
            cont[j, :len(continuations[i])] = torch.tensor(continuations[i])
        state = D.prefill(model, g.tokens, None, how, g.mask, memory_cache)
        first = state.logits[:, None]
        _, later = D.advance(model, state, cont[:, :-1]) if width > 1 else (state, first[:, :0])
        logits = torch.cat([first, later], 1)
        for j, i in enumerate(g.rows):
            out[i] = scored(logits[j, :len(continuations[i])], continuations[i])
    return out


def _score_window(model, how: Reading, contexts, continuations, memory_cache, batch_size, device) -> list[Scored]:
    """Causal readings: one prefill over left-padded context + continuation scores every position at once."""
    parts = []  # (request, context, piece of its continuation)
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        full, step = list(ctx) + list(cont), len(cont) if len(cont) <= how.window else max(1, how.window // 2)
        parts += [(i, full[:len(ctx) + s], list(cont[s:s + step])) for s in range(0, len(cont), step)]
    rows = [ctx + piece for _, ctx, piece in parts]
    got: list[Scored | None] = [None] * len(parts)
    for g in D.groups(model, [r[:-1] for r in rows], how, device, batch_size):
        width = max(len(parts[k][2]) for k in g.rows)
        state = D.prefill(model, g.tokens, None, how, g.mask, memory_cache, keep=width)
        for j, k in enumerate(g.rows):
            got[k] = scored(state.scores[j, width - len(parts[k][2]):], parts[k][2])
    out = [Scored([], []) for _ in contexts]
    for (i, _, _), sc in zip(parts, got):
        out[i].logprobs += sc.logprobs
        out[i].greedy += sc.greedy
    return out
