"""Checks of the backbones of a plan (compiler.plan.Backbone), called by compiler.validate: each problem is reported at
the binding that set the offending field. Reading a backbone's config or tokenizer never downloads anything."""
from __future__ import annotations

import re

from compiler import plan as P
from compiler.hub import LAYER_RANGE, BackboneError, embedding_rows, info
from compiler.tokens import backbones, plan_tokens, tokenizer_digest

DECODING_ROLES = ('decoder', 'ae_decoder')


def check_backbones(plan: P.Plan, fail) -> None:
    found = backbones(plan)
    for role, b in found:
        _check_backbone(plan, role, b, fail)
    if found:
        _check_tokenizer(plan, found, fail)


def _check_backbone(plan: P.Plan, role: str, b: P.Backbone, fail) -> None:
    if b.trust_remote_code:
        fail(b, 'trust_remote_code', f'{role} Backbone.trust_remote_code = True is refused: a spec never runs code '
             'shipped with a checkpoint', 'use a model whose architecture transformers ships')
    try:
        i = info(b.source, b.revision)
    except BackboneError as e:
        fail(b, e.field, f'{role} Backbone: {e.what}', e.fix)
    if role in DECODING_ROLES and not i.causal:
        fail(b, 'source', f"{role} Backbone {b.source} is a bidirectional encoder ('{i.model_type}'): it cannot "
             'decode', 'use it as the encoder (e.g. an information probe), and a causal LM or Stack as decoder')
    if b.share_encoder:
        _check_shared(plan, role, b, fail)
    elif b.lora is not None:
        try:
            # peft places the adapters on the meta-device model: a target it cannot find fails here
            from compiler.backbone import meta_module
            meta_module(b, embedding_rows(b.source, b.revision))
        except BackboneError as e:
            fail(b.lora, e.field, f'{role} Lora: {e.what}', e.fix)


def _check_tokenizer(plan: P.Plan, found: list, fail) -> None:
    """One tokenizer for the plan: the backbones', and no Data.tokenizer beside it."""
    first_role, first = found[0]
    if plan.data.tokenizer is not None:
        fail(plan.data, 'tokenizer', f"Data.tokenizer = {plan.data.tokenizer!r}, but a plan with a backbone uses the "
             f'tokenizer of {first.source}', 'remove the Data.tokenizer binding')
    digests = {}
    for role, b in found:
        try:
            digests[role] = tokenizer_digest(b.source, b.revision)
        except BackboneError as e:
            fail(b, 'source', f'{role} Backbone: {e.what}', e.fix)
    for role, b in found[1:]:
        if digests[role] != digests[first_role]:
            fail(b, 'source', f'{role} Backbone {b.source} has another tokenizer than the {first_role} Backbone '
                 f'{first.source}: one plan reads one token sequence',
                 'use backbones that share a tokenizer (e.g. one model family), or a memspec Stack')
    try:
        plan_tokens(plan)
    except BackboneError as e:
        fail(first, 'source', f'{first_role} Backbone: {e.what}', e.fix)


def _check_shared(plan: P.Plan, role: str, b: P.Backbone, fail) -> None:
    enc = plan.encoder
    if role not in DECODING_ROLES or not isinstance(enc, P.Backbone):
        fail(b, 'share_encoder', f'{role} Backbone.share_encoder = True needs a Backbone encoder to share, and only a '
             f'decoder can share it (the plan\'s encoder is {type(enc).__name__ if enc else "not set"})',
             'set Plan.encoder = @encoder/Backbone(), or share_encoder = False')
    if (b.source, b.revision, b.dtype) != (enc.source, enc.revision, enc.dtype):
        fail(b, 'source', f'{role} Backbone shares the encoder\'s base model but names another one ({b.source} '
             f'{b.revision} {b.dtype}; the encoder: {enc.source} {enc.revision} {enc.dtype})',
             'give both the same source, revision and dtype (a macro: BASE = ...)')
    if b.lora is not None:
        fail(b, 'lora', f'{role} Backbone shares the encoder\'s base with its adapter disabled: it cannot have its own',
             'remove the decoder\'s Lora, or share_encoder = False for a decoder with its own base and adapter')


def freeze_problem(plan: P.Plan, name: str) -> str | None:
    """What is wrong with a Stage.freeze name that is not a component of params(): None when it is a block range of a
    stack ('decoder.layers.0-7'), or a backbone group ('encoder.base', 'encoder.lora', 'encoder.layers.2')."""
    from compiler.cost import components, stack_of
    role, _, part = name.partition('.')
    if role not in P.STACK_ROLES or role not in components(plan) or not part:
        return f"which the '{plan.family}' graph does not have"
    s = stack_of(plan, role)
    m = LAYER_RANGE.match(part)
    if m:
        lo, hi = int(m[1]), int(m[2] or m[1])
        if lo > hi or hi >= s.n_layers:
            return f'but the {role} has {s.n_layers} layers (0-{s.n_layers - 1})'
        return None
    if isinstance(s, P.Backbone):
        if part == 'base' or (part == 'lora' and s.lora is not None):
            return None
        if part == 'lora':
            return f'but the {role} Backbone has no Lora'
    if re.match(r'^layers\.', part):
        return "which is not a block range: write <stack>.layers.I or <stack>.layers.I-J (I <= J)"
    return f"which the '{plan.family}' graph does not have"



def report(plan: P.Plan) -> dict:
    """The compile report's account of the backbones (empty without): what each is, and where memspec's special
    tokens are in its vocabulary (new rows included: vocab = embedding rows + new rows)."""
    found = backbones(plan)
    if not found:
        return {}
    out = {}
    for role, b in found:
        i = info(b.source, b.revision)
        out[role] = {'source': b.source, 'revision': b.revision, 'folder': i.folder, 'model_type': i.model_type,
                     'causal': i.causal, 'd_model': i.d_model, 'n_layers': i.n_layers, 'dtype': b.dtype,
                     'lora': None if b.lora is None else b.lora.to_dict(), 'train_base': b.train_base,
                     'share_encoder': b.share_encoder}
    t = plan_tokens(plan)
    return {'backbones': out, 'tokens': {
        'vocab': t.vocab, 'embedding_rows': t.rows, 'tokenizer_size': t.tokenizer_size, 'new_rows': list(t.new),
        'special': {name: {'id': t.ids[name], 'from': t.origin[name]} for name in t.ids}}}
