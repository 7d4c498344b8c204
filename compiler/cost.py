"""Cost model, analytic from the Plan alone (tests check it against built graphs).

- parameters per component (trainable / frozen per stage);
- FLOPs per input token, counting the work the built graph does (tested against torch's FLOP counter):
  forward = 2 x matmul parameters touched + attention scores; training = 3 x
  forward for every stack that trains or has a trainable component upstream, 1 x forward for a stack that is
  frozen with nothing trainable upstream (it runs under no_grad);
- KV-cache bytes per sequence at inference (fp32), the memory model's selling point;
- activation memory per batch (saved tensors at Run.precision: 4 bytes in fp32, 2 under bf16 / fp16 autocast; only
  each block's input with Run.activation_checkpointing; a stated approximation).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from compiler import plan as P
from compiler.families import Work, family, in_component, needs_ae_decoder
from compiler.tokens import vocab_of

BYTES = 4  # fp32: parameters, optimizer state, the KV cache at inference, activations in fp32 training
ACTIVATION_BYTES = {'fp32': 4, 'bf16': 2, 'fp16': 2}  # saved activations under Run.precision (autocast)


def stack_params(s: P.Stack, vocab: int, seq_len: int, embedding: bool, head: bool) -> dict[str, int]:
    if isinstance(s, P.Backbone):  # counted on the model built from its config on the meta device
        from compiler import backbone
        return {} if s.share_encoder else backbone.params(s, '', vocab)
    d, f = s.d_model, s.ffn
    if s.kind == 'transformer':
        hd = d // s.n_heads
        layer = 2 * d * s.n_heads * hd + 2 * d * s.kv_heads * hd + 3 * d * f + 2 * d
        norm = d
    else:
        h, k = s.mixer_heads, s.mixer_kernel
        conv = h * seq_len * seq_len * k + h * seq_len + (2 * d * d if h > 1 else 0)
        layer = conv + 4 * d + (d * f + f + f * d + d)
        norm = 2 * d
    out = {'embedding': vocab * d} if embedding else {}
    out.update(layers=layer * s.n_layers, norm=norm)
    if head:
        out['head'] = d * vocab
    return out


def _widths(plan: P.Plan) -> tuple[int, int]:
    """(encoder width, memory width): memories are formed at the decoder's width (without an encoder, from it),
    except concatenated ones (Memory.combine = 'concat'), which keep the encoder's width beside the token embedding."""
    d_dec = plan.decoder.d_model
    d_enc = plan.encoder.d_model if family(plan).has_encoder else d_dec
    return d_enc, (d_enc if plan.memory.combine == 'concat' else d_dec)


def params(plan: P.Plan, vocab: int | None = None) -> dict[str, int]:
    """{'encoder.embedding': n, ...} for every component of the plan's graph, in the graph's order."""
    vocab = vocab or vocab_of(plan)
    fam, m, lengths = family(plan), plan.memory, family(plan).lengths(plan)
    out: dict[str, int] = {}

    def add(role, stack, length, embedding, head):
        out.update({f'{role}.{k}': v for k, v in stack_params(stack, vocab, length, embedding, head).items()})

    if fam.has_encoder:
        add('encoder', plan.encoder, lengths['encoder'], True, False)
    d_enc, d_dec = _widths(plan)
    if fam.forms_memories and m.compression > 1:
        c = d_enc // m.compression
        out['memory.compress'] = d_enc * c + c + c * d_enc + d_enc
    if fam.forms_memories and d_enc != d_dec:
        out['memory.proj'] = d_enc * d_dec
    ae = needs_ae_decoder(plan)
    if (not fam.token_decoder or ae) and m.decoder_input == 'unroll':
        out['memory.unroll'] = (d_dec // 2) * d_dec + d_dec
    if fam.pad_slot and m.pad == 'learned':
        out['memory.pad'] = d_dec
    add('decoder', plan.decoder, lengths['decoder'], fam.token_decoder, True)
    if m.combine == 'concat':  # tokens fill the decoder width the memory leaves
        out['decoder.embedding'] = vocab * (plan.decoder.d_model - d_enc)
    if ae:
        add('ae_decoder', plan.ae_decoder or plan.decoder, m.chunk_len, False, True)
    return out


def components(plan: P.Plan) -> list[str]:
    """Freezable component names of the plan's graph (what Stage.freeze and Stage.init_from accept): each top-level
    module and its parts that hold parameters, in the graph's order. Derived from params(), so checking a spec
    needs no graph (tests/test_families.py checks it against the built one)."""
    names: list[str] = []
    for key in params(plan):
        top = key.split('.', 1)[0]
        names += [top] if top not in names else []
        names.append(key)
    return names


def stack_of(plan: P.Plan, role: str) -> P.Stack:
    return plan.ae_decoder or plan.decoder if role == 'ae_decoder' else getattr(plan, role)


BASE_GROUPS = ('embedding', 'layers', 'other', 'head')  # a backbone's pretrained groups ('<role>.base')


def is_frozen(component: str, freeze) -> bool:
    """Is a component of params() frozen by these freeze names? '<role>.base' names a backbone's pretrained groups."""
    role, _, group = component.partition('.')
    return any(in_component(component, f) or (f == f'{role}.base' and group in BASE_GROUPS) for f in freeze)


def effective_freeze(plan: P.Plan, freeze) -> tuple[str, ...]:
    """A stage's freeze names and the pretrained weights of every backbone that does not train its base
    (Backbone.train_base = False; a share_encoder decoder has none of its own)."""
    return tuple(freeze) + tuple(f'{r}.base' for r in P.STACK_ROLES if isinstance(getattr(plan, r), P.Backbone)
                                 and not getattr(plan, r).train_base and not getattr(plan, r).share_encoder)


def frozen_params(plan: P.Plan, freeze) -> int:
    """Parameters a stage freezes: whole components, block ranges of Stacks ('decoder.layers.0-3': the blocks are
    alike, so a fraction of the layers' count) and backbone groups (counted on the meta-device model)."""
    p, freeze = params(plan), effective_freeze(plan, freeze)
    total = 0
    for role in P.STACK_ROLES:
        s = stack_of(plan, role) if role in {c.split('.', 1)[0] for c in p} else None
        if isinstance(s, P.Backbone):
            from compiler import backbone
            parts = ['' if f == role else f[len(role) + 1:] for f in freeze if in_component(f, role)]
            total += backbone.frozen_count(s, vocab_of(plan), parts)
        elif s is not None:
            frozen = {c for c in p if c.startswith(role + '.') and is_frozen(c, freeze)}
            total += sum(p[c] for c in frozen)
            layers = set()
            for f in freeze:
                m = re.match(rf'^{role}\.layers\.(\d+)(?:-(\d+))?$', f)
                layers |= set(range(int(m[1]), int(m[2] or m[1]) + 1)) if m else set()
            if layers and f'{role}.layers' not in frozen:
                total += p[f'{role}.layers'] * len(layers) // s.n_layers
    return total + sum(v for c, v in p.items() if c.split('.', 1)[0] not in P.STACK_ROLES and is_frozen(c, freeze))


def _block_flops(s: P.Stack, t: int, rows: int, attention: bool = True) -> float:
    """Forward FLOPs of one block over t positions of which `rows` (the last ones) are computed through
    (keep_last): the others only feed keys and values (transformer) or the token mixing (mixer)."""
    if isinstance(s, P.Backbone):  # transformers computes every position; the graph slices afterwards
        from compiler import backbone
        return backbone.block_flops(s, t, attention)
    d, f = s.d_model, s.ffn
    if s.kind == 'transformer':
        hd = d // s.n_heads
        kv = t * 2 * 2 * d * s.kv_heads * hd
        per_row = 2 * 2 * d * s.n_heads * hd + 2 * 3 * d * f  # q and o projections, SwiGLU
        # scores + weighted sum; a causal query at position i sees i + 1 keys
        seen = (t * (t + 1) / 2 - (t - rows) * (t - rows + 1) / 2) if s.causal else rows * t
        return kv + rows * per_row + (2 * 2 * s.n_heads * hd * seen if attention else 0)
    # the token conv maps t positions to t over the hidden dim, per head on d/h channels; head projections in/out
    conv = 2 * t * t * s.mixer_kernel * d + (t * 2 * 2 * d * d if s.mixer_heads > 1 else 0)
    return conv + rows * 2 * 2 * d * f


def stack_flops(s: P.Stack, t: int, keep: int | None = None, attention: bool = True) -> float:
    """Forward FLOPs of a Stack over one sequence of t positions; the last block computes only the last `keep`."""
    return (s.n_layers - 1) * _block_flops(s, t, t, attention) + _block_flops(s, t, keep or t, attention)


@dataclass
class StageCost:
    name: str
    trainable: int
    frozen: int
    train_flops_per_token: float
    activation_bytes: int


def forward_flops(plan: P.Plan, objective: str = 'clm', attention: bool = True) -> tuple[float, float]:
    """(decoder side, encoder side) forward FLOPs of one example (N chunks of L tokens) for one objective pass:
    the family's passes (compiler/families.py) priced stack by stack. They count exactly the work the built graph
    does: memories read one encoder position (keep_last), the head runs on token positions only, copy objectives
    decode only the supervised second half, autoencode runs the (ae_)decoder over each chunk without slots."""
    work: Work = family(plan).work(plan, objective)
    m, vocab = plan.memory, vocab_of(plan)
    d_enc, d_dec = _widths(plan)
    dec = enc = 0.0
    for p in work.passes:
        s = stack_of(plan, p.stack)
        flops = stack_flops(s, p.length, p.keep, attention) + p.head * 2 * s.d_model * vocab
        if p.unroll:  # one shared Linear(d/2 -> d) per position
            flops += p.length * 2 * (s.d_model // 2) * s.d_model
        if p.stack == 'encoder':
            enc += p.rows * flops
        else:
            dec += p.rows * flops
    form = ((4 * d_enc * (d_enc // m.compression) if m.compression > 1 else 0)
            + (2 * d_enc * d_dec if d_enc != d_dec else 0))
    # memories are formed on the encoder side, or (recurrent, no encoder) from the decoder's output
    if family(plan).has_encoder:
        enc += work.forms * form
    else:
        dec += work.forms * form
    return dec, enc


def flops_per_token(plan: P.Plan, freeze=(), training=False, objective: str = 'clm', attention: bool = True) -> float:
    """FLOPs per input token of one objective pass: forward, or forward + backward when training (3 x forward
    for a side that trains or has a trainable component upstream, 1 x for a frozen encoder, which runs under
    no_grad when nothing upstream trains)."""
    dec, enc = forward_flops(plan, objective, attention)
    tokens = plan.memory.chunks * plan.memory.chunk_len
    if not training:
        return (dec + enc) / tokens
    freeze = effective_freeze(plan, freeze)
    enc_frozen = all(is_frozen(c, freeze) for c in params(plan) if c.startswith('encoder.'))
    return (3 * dec + (1 if enc_frozen else 3) * enc) / tokens


def kv_cache_bytes(plan: P.Plan) -> int:
    """KV cache of the decoder for one sequence at inference (fp32). Mixers keep no KV cache (0)."""
    dec = plan.decoder
    ctx = family(plan).lengths(plan)['decoder']
    if isinstance(dec, P.Backbone):
        from compiler import backbone
        return backbone.kv_bytes(dec, ctx)
    if dec.kind != 'transformer':
        return 0
    return 2 * dec.n_layers * dec.kv_heads * (dec.d_model // dec.n_heads) * ctx * BYTES


def activation_bytes(plan: P.Plan, batch: int, freeze=()) -> int:
    """Saved activations for backward, per batch, at Run.precision, for a clm pass (the family's main objective). Per
    block and position: transformer ~ 10 d + 4 ffn values (norm in/out, q k v o, residuals, gate/up/act/product),
    mixer ~ 6 d + 2 ffn; with Run.activation_checkpointing a block keeps only its input (d) and one block's values
    exist again while it is recomputed; logits 2 x vocab per predicted token; a frozen encoder with nothing
    trainable upstream saves nothing (no_grad)."""
    freeze = effective_freeze(plan, freeze)
    enc_frozen = all(is_frozen(c, freeze) for c in params(plan) if c.startswith('encoder.'))
    floats = 0
    for p in family(plan).work(plan, 'clm').passes:
        if p.stack == 'encoder' and enc_frozen:
            continue
        s = stack_of(plan, p.stack)
        ffn = s.ffn if not isinstance(s, P.Backbone) else s.info().ffn
        per = (6 * s.d_model + 2 * ffn) if s.kind == 'mixer' else (10 * s.d_model + 4 * ffn)
        kept = s.d_model * s.n_layers + per if plan.run.activation_checkpointing else per * s.n_layers
        floats += batch * p.rows * (p.length * kept + p.head * 2 * vocab_of(plan))
    return int(floats * ACTIVATION_BYTES[plan.run.precision])


def stage_costs(plan: P.Plan) -> list[StageCost]:
    p = params(plan)
    out = []
    for s in plan.curriculum:
        frozen = frozen_params(plan, s.freeze)
        flops = sum(flops_per_token(plan, s.freeze, True, o.kind) for o in s.objectives)  # one pass per objective
        out.append(StageCost(s.name, sum(p.values()) - frozen, frozen, flops,
                             activation_bytes(plan, plan.batch_rows(s), s.freeze)))
    return out


def training_flops(plan: P.Plan) -> float:
    """Total training FLOPs of the curriculum: steps x tokens per step x FLOPs per token, stage by stage."""
    tokens = plan.memory.chunks * plan.memory.chunk_len
    return sum(s.steps * plan.batch_rows(s) * tokens * c.train_flops_per_token
               for s, c in zip(plan.curriculum, stage_costs(plan)))
