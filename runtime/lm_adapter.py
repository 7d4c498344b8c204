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

lm-eval's conventions, as its own HF model keeps them: generation kwargs go through lm-eval's normalize_gen_kwargs
(max_gen_toks, or its aliases max_new_tokens, max_tokens, max_completion_tokens; default 256; a temperature above 0
without do_sample samples); a causal reading refuses max_gen_toks >= its window (the HF model's assertion) and warns
when it left-truncates a context; an empty or whitespace-only context is conditioned on the end-of-document token,
as lm-eval does for an empty context. An unknown model argument is refused (a misspelled `memroy=ablated` would
otherwise evaluate memory=on).
"""
from __future__ import annotations

import math
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows

from compiler.args import suggestion
from compiler.errors import UserError
from runtime.decoding import generate
from runtime.generate import load_run
from runtime.reading import MODES, MemoryCache, check_decodes, reading
from runtime.scoring import score

MODEL_ARGS = ('run', 'stage', 'memory', 'runs', 'device', 'batch_size', 'max_batch_size', 'keep', 'chunk_len')
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default (HFLM.max_gen_toks)
SAMPLING = ('do_sample', 'temperature', 'top_k')  # generation kwargs read here besides until and max_gen_toks


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


def _count(name: str, value, lo: int) -> int | None:
    """An integer model argument (None or '' when not given)."""
    if value in (None, ''):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < lo:
        raise UserError(f'model_args {name}={value}', f'{name} must be an integer of at least {lo}',
                        f'e.g. --model_args run=runs/0,{name}={max(lo, 1)}')
    return n


def check_model_args(memory, extra: dict) -> None:
    """Refuse what the harness would otherwise drop silently: unknown arguments and unknown memory modes."""
    for key in extra:
        raise UserError(f'model_args {key}={extra[key]}', f"the memspec model has no argument '{key}'"
                        + suggestion(key, MODEL_ARGS).replace(';', ':', 1),
                        f"use {', '.join(MODEL_ARGS)} (runtime/lm_adapter.py)")
    if memory not in MODES:
        raise UserError(f'model_args memory={memory}', 'unknown memory mode' + suggestion(memory, MODES),
                        f"use one of {', '.join(MODES)}")


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
                 keep=None, chunk_len=None, **extra):
        super().__init__()
        check_model_args(memory, extra)
        keep, chunk_len = _count('keep', keep, 0), _count('chunk_len', chunk_len, 1)
        self.device_name = _device(device)
        loaded = load_run(str(run), stage or None, str(runs), self.device_name)  # refuses what cannot score
        self.plan, self.model, self.data, self.folder = loaded.plan, loaded.model, loaded.vocab, loaded.folder.root
        self.stage = stage or None
        self.how = reading(self.model, memory, keep, chunk_len)  # refused here, once, if it cannot
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
        # a whitespace-only context encodes to no token (lm-eval moves its spaces into the continuation): condition
        # on <eod>, as lm-eval does for an empty context
        got = score(self.model, [list(requests[i][1]) or [self.eot_token_id] for i in idx],
                    [list(requests[i][2]) for i in idx], self.how, self.memories, self.batch,
                    self.device_name) if idx else []
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
        """Greedy (or sampled: do_sample, temperature, top_k) continuations, batched per generation settings; each
        stops at the end-of-document token, at any `until` string (cut there) or after max_gen_toks tokens."""
        check_decodes(self.plan, f'run {self.folder}', sampling=True)
        out: list[str] = [''] * len(requests)
        by: dict[tuple, list[int]] = {}
        ignored: set[str] = set()
        for i, req in enumerate(requests):
            settings, dropped = generation_settings(req.args[1])
            by.setdefault(settings, []).append(i)
            ignored |= dropped
        if ignored:
            print(f"[memspec] warning: generation kwargs {', '.join(sorted(ignored))} are not supported here and "
                  'ignored', file=sys.stderr)
        gen = torch.Generator(self.device_name).manual_seed(0)
        for (until, max_new, temp, top_k), idx in by.items():
            if max_new == 0:
                continue  # nothing to generate: empty continuations
            rows = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in idx]
            if self.how.causal:
                rows = self.fit_window(rows, max_new)

            def stop(new, until=until):
                return bool(until) and any(u in self.tok_decode(new) for u in until)
            for s in range(0, len(rows), self.batch):
                res = generate(self.model, rows[s:s + self.batch], max_new_tokens=max_new, temperature=temp,
                               top_k=top_k, eod=self.eot_token_id, generator=gen, mode=self.how,
                               memory_cache=self.memories, stop=stop, device=self.device_name)
                for i, toks in zip(idx[s:s + self.batch], res.tokens):
                    text = self.tok_decode(toks)
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
        return out


    def fit_window(self, rows: list[list[int]], max_new: int) -> list[list[int]]:
        """Causal readings: the window holds the context and every new token but the last. As lm-eval's HF model,
        refuse max_gen_toks that leave no room for a context, and say so when a context loses its oldest tokens."""
        window = self.how.window
        if max_new >= window:
            raise UserError(f'max_gen_toks {max_new}', f'a {self.plan.family} reading holds {window} tokens: '
                            f'generating {max_new} would leave at most {window - max_new + 1} of the context',
                            f'generate fewer tokens: lm_eval --gen_kwargs max_gen_toks=N or runtime.evaluate '
                            f'--gen-kwargs max_gen_toks=N with N < {window} (memspec_reconstruct needs the chunk '
                            f'length, {self.plan.memory.chunk_len})')
        keep = window - max_new + 1
        cut = [len(r) - keep for r in rows if len(r) > keep]
        if cut:
            print(f'[memspec] warning: {len(cut)} of {len(rows)} contexts are longer than the {keep} tokens a '
                  f'{window}-token window leaves beside {max_new} generated ones: their oldest {min(cut)}..'
                  f'{max(cut)} tokens are dropped (left truncation, as lm-eval\'s HF model does)', file=sys.stderr)
        return [r[-keep:] for r in rows]


def generation_settings(kwargs) -> tuple[tuple, set[str]]:
    """((until, max_gen_toks, temperature, top_k), the kwargs not read here) of a request's generation kwargs,
    normalized by lm-eval's own normalize_gen_kwargs."""
    bad = UserError(f'gen_kwargs {dict(kwargs or {})}', 'max_gen_toks must be an integer >= 0, temperature a finite '
                    'number >= 0, top_k an integer >= 1',
                    'e.g. --gen_kwargs max_gen_toks=32,do_sample=True,temperature=0.7')
    try:
        kw = normalize_gen_kwargs(dict(kwargs or {}), DEFAULT_MAX_GEN_TOKS)
        # do_sample without a temperature samples at 1, transformers' default, as the HF model then does
        temp = float(kw.get('temperature', 1.0)) if kw.get('do_sample') else 0.0
        given = float((kwargs or {}).get('temperature', 0.0))  # nan would silently mean greedy
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(given):
        raise bad
    max_new, top_k = kw['max_gen_toks'], kw.get('top_k')
    if max_new < 0 or not math.isfinite(temp) or temp < 0 or (top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1)):
        raise bad
    ignored = {k for k in kw if k not in ('until', 'max_gen_toks', *SAMPLING)}
    return (tuple(kw['until']), max_new, temp, None if temp == 0 else top_k), ignored


class _Empty:
    """The score of an empty continuation."""
    logprob, is_greedy, greedy = 0.0, True, []
