"""What decoding produces, whichever way a model reads (runtime/reading.py): sampled tokens (`sample`, `Generation`)
and teacher-forced scores (`Scored`)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, vocab] -> [B] token ids: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature == 0:
        return logits.argmax(-1)
    # in float64 and shifted so the largest is 0 before dividing: a tiny temperature (1e-300 is 0 in float32) then
    # gives 0 and -inf (a greedy draw), never 0 / 0 or inf - inf = nan, which torch.multinomial refuses
    logits = logits.double()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def as_rows(tokens) -> list[list[int]]:
    rows = tokens.tolist() if isinstance(tokens, torch.Tensor) else [list(map(int, r)) for r in tokens]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError('every row needs at least one conditioning token')
    return rows


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, the new tokens (an eod token ends a row and is not included)
    ttft_s: float  # prefill (memory encoding included) + first token
    decode_s: float  # every later token
    decoded: int  # tokens sampled after the first (per row)
    kv_cache_bytes: int  # the decoder's cache tensors (of the largest group)
    dropped: list[int]  # per row, context chunks beyond the memory slots

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput of the batch: tokens after the first, all rows, per second."""
        return self.decoded * len(self.tokens) / self.decode_s if self.decoded else float('nan')


def clock(device) -> float:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)  # kernels run asynchronously: time what has finished
    return time.perf_counter()


def record(rows: list[int], tok: torch.Tensor, out, done, eod, stop) -> None:
    for i, t in zip(rows, tok.tolist()):
        if done[i]:
            continue
        if eod is not None and t == eod:
            done[i] = True
            continue
        out[i].append(t)
        if stop is not None and stop(out[i]):
            done[i] = True


@dataclass
class Scored:
    """Teacher-forced scores of one continuation: per token log-probability and whether it was the argmax."""
    logprobs: list[float]
    greedy: list[bool]

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def scored(logits: torch.Tensor, target: list[int]) -> Scored:
    """logits [c, vocab] scoring the c target tokens."""
    lp = torch.log_softmax(logits.float(), -1)
    t = torch.tensor(target, device=logits.device)
    return Scored(lp[torch.arange(len(target), device=logits.device), t].tolist(),
                  (lp.argmax(-1) == t).tolist())
