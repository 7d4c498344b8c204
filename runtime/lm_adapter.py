"""The lm-evaluation-harness model `memspec`: any recorded run, memory-conditioned, under the harness' request types.

    import runtime.lm_adapter  # registers the model
    lm_eval.simple_evaluate(model='memspec', model_args='run=runs/0,stage=combined,memory=on', tasks=[...])
    python -m runtime.harness --model memspec --model_args run=runs/0 --include_path specs/eval --tasks memspec

model_args: run (a run id or its full name <id>-<key> under `runs`, default folder 'runs', or a run folder's
path), stage (default: the final weights), memory (on | ablated | full_context, runtime/reading.py), keep (memories
read, 0..N-1) and chunk_len (tokens per memory, 1..L) for compression sweeps, device (default: the harness' --device
when it is usable here, else cpu), batch_size (rows per decoder call, default 32; the harness' CLI passes its
--batch_size, so there give --batch_size, not a model argument).

Every request is read as runtime.generate reads text (runtime/reading.py): the context is cut into chunk_len-token
chunks, the complete ones become memories in one batched encoder call (through an LRU shared by all requests, so
choices that share a context encode it once), the decoder keeps its newest N-1 memories, the last partial chunk stays
tokens; a continuation is scored token by token with generation's cache semantics (a chunk that fills up becomes a
memory). Families without memories (clm, full_context, no_memory) run through the same code as plain LMs; causal LMs
read the newest tokens that fit their window (context truncated on the left, as the harness' own models do).
Families and decoders without a KV cache (masked mixers, recurrent, oracle) are scored by their trained forward pass
over a window of N x L tokens (runtime/window.py); the oracle scores but does not generate.

loglikelihood returns the harness' (logprob, is_greedy) pairs; each also carries `.greedy`, the per-token argmax
flags that the memspec tasks' token-accuracy metrics read (specs/eval/memspec_tasks.py).
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows

from runtime.decoding import generate
from runtime.generate import load_run
from runtime.reading import MemoryCache, check_decodes, reading
from runtime.scoring import score


class Likelihood(tuple):
    """(logprob, is_greedy), as every harness task unpacks it, with the per-token flags in `.greedy`."""

    def __new__(cls, scored):
        self = super().__new__(cls, (scored.logprob, scored.is_greedy))
        self.greedy = list(scored.greedy)
        return self

    def __reduce__(self):  # the harness' request cache pickles results
        return _likelihood, (tuple(self), self.greedy)


def _likelihood(pair, greedy):
    self = tuple.__new__(Likelihood, pair)
    self.greedy = greedy
    return self


def _device(device) -> str:
    """The harness passes its --device (default cuda:0 in its CLI); use it where it works, else the CPU."""
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        torch.empty(0, device=device)
        return str(device)
    except (RuntimeError, AssertionError):
        print(f'[memspec] device {device} is not usable here; evaluating on cpu', file=sys.stderr)
        return 'cpu'


@register_model('memspec')
class MemspecLM(TemplateLM):
    def __init__(self, run, stage=None, memory='on', runs='runs', device=None, batch_size=32, max_batch_size=None,
                 keep=None, chunk_len=None, **_ignored):
        super().__init__()
        self.device_name = _device(device)
        loaded = load_run(str(run), stage or None, str(runs), self.device_name)  # refuses what cannot score
        self.plan, self.model, self.data, self.folder = loaded.plan, loaded.model, loaded.vocab, loaded.folder.root
        self.stage = stage or None
        self.how = reading(self.model, memory, None if keep in (None, '') else int(keep),
                           None if chunk_len in (None, '') else int(chunk_len))  # refused here, once, if it cannot
        self.memory = memory
        self.tok = self.data.tokenizer
        self.memories = MemoryCache()
        self.batch = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 32

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.data.eod_id  # documents are joined by <eod> in training: the natural "nothing before"

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(list(tokens), skip_special_tokens=False)

    # ------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[Likelihood]:
        out = [Likelihood(_Empty()) for _ in requests]  # an empty continuation has log-likelihood 0
        idx = [i for i, (_, _, cont) in enumerate(requests) if cont]
        got = score(self.model, [list(requests[i][1]) for i in idx], [list(requests[i][2]) for i in idx],
                    self.how, self.memories, self.batch, self.device_name) if idx else []
        for i, s in zip(idx, got):
            out[i] = Likelihood(s)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood. Memory readings read any length: the document after one <eod> token.
        Causal readings: the harness' rolling windows of the model's window (each window's first token has at
        least one token of context)."""
        pairs, owner = [], []
        for k, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            if self.how.causal:
                for inp, pred in get_rolling_token_windows(ids, self.eot_token_id, self.how.window, 1):
                    pairs.append((inp[:len(inp) - len(pred) + 1], pred))
                    owner.append(k)
            elif ids:
                pairs.append(([self.eot_token_id], ids))
                owner.append(k)
        got = score(self.model, [p[0] for p in pairs], [p[1] for p in pairs], self.how, self.memories,
                    self.batch, self.device_name) if pairs else []
        out = [0.0] * len(requests)
        for k, s in zip(owner, got):
            out[k] += s.logprob
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample/temperature) continuations, batched per generation settings; each
        stops at the end-of-document token, at any `until` string (cut there) or after max_gen_toks tokens."""
        check_decodes(self.plan, f'run {self.folder}', sampling=True)
        out: list[str | None] = [None] * len(requests)
        by: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1] or {})
            until = kw.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            temp = float(kw.get('temperature', 0.0) or 0.0) if kw.get('do_sample', False) else 0.0
            by.setdefault((tuple(until), int(kw.get('max_gen_toks', 256)), temp), []).append(i)
        gen = torch.Generator(self.device_name).manual_seed(0)
        for (until, max_new, temp), idx in by.items():
            if self.how.causal:  # the window holds the context and every new token but the last
                max_new = min(max_new, self.how.window - 1)
            rows = []
            for i in idx:
                ids = self.tok_encode(requests[i].args[0]) or [self.eot_token_id]
                rows.append(ids[-(self.how.window - max_new + 1):] if self.how.causal else ids)

            def stop(new, until=until):
                return bool(until) and any(u in self.tok_decode(new) for u in until)
            for s in range(0, len(rows), self.batch):
                res = generate(self.model, rows[s:s + self.batch], max_new_tokens=max_new, temperature=temp,
                               eod=self.eot_token_id, generator=gen, mode=self.how, memory_cache=self.memories,
                               stop=stop, device=self.device_name)
                for i, toks in zip(idx[s:s + self.batch], res.tokens):
                    text = self.tok_decode(toks)
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
        return out


class _Empty:
    """The score of an empty continuation."""
    logprob, is_greedy, greedy = 0.0, True, []
