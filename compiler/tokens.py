"""memspec's special tokens in a pretrained backbone's own vocabulary.

memspec needs four ids (runtime/data.py SPECIAL_TOKENS): <pad> (masked everywhere, never scored), <eod> (end of
document, packed between documents and predicted), <blank> (blank copy's placeholder) and <copy> (the copy
delimiter). With a backbone each comes from the tokenizer where it has one, in this order:
- <eod>: the eos token (else sep, BERT's [SEP]);
- <pad>: the pad token, else the eos token (pad positions are masked out of attention and loss, so any id serves);
- <blank>: the mask token (BERT's [MASK]), else the first reserved token (<|reserved_special_token_N|>, [unusedN],
  <unusedN>), else an embedding row beyond the tokenizer (Qwen's embedding has spare rows);
- <copy>: the next reserved token, else the next spare row;
- else a new embedding row after the model's rows (BackboneModule.new_tokens), listed in the plan's report and kept
  by the checkpoint.
The vocabulary is the embedding's rows plus the new ones: nothing is resized.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass

from compiler.hub import BackboneError, embedding_rows, resolve

RESERVED = re.compile(r'^(<\|reserved_special_token_\d+\|>|\[unused\d+\]|<unused\d+>)$')
NAMES = ('<pad>', '<eod>', '<blank>', '<copy>')


@functools.cache
def load_tokenizer(source: str, revision: str):
    """The backbone's fast tokenizer (transformers), from its folder; never downloads."""
    import transformers
    folder = resolve(source, revision)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise BackboneError(f'{source} has no tokenizer transformers can load: {str(e).splitlines()[0]}',
                            'use a model folder with its tokenizer files (tokenizer.json)')
    if getattr(tok, 'backend_tokenizer', None) is None:
        raise BackboneError(f'{source} has no fast tokenizer (tokenizer.json)',
                            'use a model folder whose tokenizer transformers loads as a fast tokenizer')
    return tok


@dataclass(frozen=True)
class TokenMap:
    ids: dict  # memspec name -> id
    origin: dict  # memspec name -> how it was found ('eos_token <|end_of_text|>', 'new row', ...)
    rows: int  # the model's embedding rows
    tokenizer_size: int
    new: tuple  # memspec names given new rows (ids rows, rows + 1, ...)

    @property
    def vocab(self) -> int:
        return self.rows + len(self.new)


@functools.cache
def token_map(source: str, revision: str, rows: int) -> TokenMap:
    tok = load_tokenizer(source, revision)
    size = len(tok)
    ids, origin, taken = {}, {}, set()

    def attr(name):
        i = getattr(tok, f'{name}_token_id', None)
        return (i, f'{name}_token {getattr(tok, f"{name}_token")}') if isinstance(i, int) and i < rows else None

    reserved = iter(sorted((i, t) for t, i in tok.get_vocab().items() if RESERVED.match(t) and i < rows))
    spare = iter(range(size, rows))
    new = []

    def free(name):
        for i, t in reserved:
            if i not in taken:
                return i, f'reserved {t}'
        for i in spare:
            return i, 'spare embedding row (beyond the tokenizer)'
        new.append(name)
        return rows + len(new) - 1, 'new embedding row'

    rules = {'<eod>': lambda: attr('eos') or attr('sep'), '<pad>': lambda: attr('pad') or attr('eos'),
             '<blank>': lambda: attr('mask'), '<copy>': lambda: None}
    for name in ('<eod>', '<pad>', '<blank>', '<copy>'):
        found = rules[name]()
        if found is None or (name in ('<blank>', '<copy>') and found[0] in taken):
            found = free(name)
        ids[name], origin[name] = found
        taken.add(found[0])
    return TokenMap({n: ids[n] for n in NAMES}, {n: origin[n] for n in NAMES}, rows, size, tuple(new))


def backbones(plan) -> list:
    """(role, Backbone) of every backbone in the plan, the encoder first (the tokens flow from it)."""
    from compiler.plan import Backbone
    return [(r, getattr(plan, r)) for r in ('encoder', 'decoder', 'ae_decoder')
            if isinstance(getattr(plan, r), Backbone)]


def plan_tokens(plan) -> TokenMap | None:
    """The token map of a plan with backbones (they share one tokenizer: compiler.validate), None without."""
    found = backbones(plan)
    if not found:
        return None
    b = found[0][1]
    return token_map(b.source, b.revision, embedding_rows(b.source, b.revision))


def vocab_of(plan) -> int:
    """The plan's vocabulary: the backbone's embedding rows plus new rows, else Data.vocab_size."""
    t = plan_tokens(plan)
    return plan.data.vocab_size if t is None else t.vocab


def tokenizer_digest(source: str, revision: str) -> str:
    """Identity of a backbone's tokenizer: its vocabulary, special tokens included (two sources with one tokenizer,
    e.g. Llama-3.2-1B and Llama-3.1-8B, agree)."""
    tok = load_tokenizer(source, revision)
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


