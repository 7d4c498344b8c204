"""Retrieval queries, one definition for training (compiler.objectives.retrieval_loss) and for the offline retrieval
evaluation of stored memories (store.analyze retrieve): a chunk's query is a random contiguous n-gram ('ngram') or n
random tokens in their order ('nbag') of its real tokens, right-padded, key mask True on the query tokens. The
encoder embeds the query as it embeds a chunk (Graph.encode), and retrieval asks whether it lands nearest its
own chunk's memory."""
from __future__ import annotations

import torch


def queries(tokens: torch.Tensor, real: int, n: int, mode: str, pad: int,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L] whose first `real` tokens are real (padding follows them) -> (query tokens [B, L] on the CPU,
    key mask [B, L]): per row min(n, real) tokens, drawn with `generator` (one row after another for 'nbag')."""
    b, l = tokens.shape
    n = min(n, real)
    if mode == 'ngram':
        start = torch.randint(0, real - n + 1, (b,), generator=generator)
        cols = start[:, None] + torch.arange(n)
    elif mode == 'nbag':
        cols = torch.stack([torch.randperm(real, generator=generator)[:n].sort().values for _ in range(b)])
    else:
        raise ValueError(f'unknown query mode {mode!r} (ngram or nbag)')
    q_tokens = torch.full((b, l), pad, dtype=tokens.dtype)
    q_tokens[:, :n] = tokens.gather(1, cols.to(tokens.device))
    q_mask = torch.zeros(b, l, dtype=torch.bool)
    q_mask[:, :n] = True
    return q_tokens, q_mask
