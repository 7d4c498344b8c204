"""Cost model, analytic from the Plan alone (tests check it against built graphs).

- parameters per component (trainable / frozen per stage);
- FLOPs per input token, counting the work the built graph does (tested against torch's FLOP counter):
  forward = 2 x matmul parameters touched + attention scores; training = 3 x
  forward for every stack that trains or has a trainable component upstream, 1 x forward for a stack that is
  frozen with nothing trainable upstream (it runs under no_grad);
- KV-cache bytes per sequence at inference (fp32), the memory model's selling point;
- activation memory per batch (fp32 saved tensors, a stated approximation).
"""
from __future__ import annotations

from dataclasses import dataclass

from compiler import plan as P
from compiler.families import Work, family, in_component, needs_ae_decoder

BYTES = 4  # fp32 on CPU (bf16 autocast on CPU is 15x slower here: docs/design.md)


def stack_params(s: P.Stack, vocab: int, seq_len: int, embedding: bool, head: bool) -> dict[str, int]:
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
    """(encoder width, decoder width); without an encoder, memories are formed at the decoder's width."""
    d_dec = plan.decoder.d_model
    return (plan.encoder.d_model if family(plan).has_encoder else d_dec), d_dec


def params(plan: P.Plan, vocab: int | None = None) -> dict[str, int]:
    """{'encoder.embedding': n, ...} for every component of the plan's graph, in the graph's order."""
    vocab = vocab or plan.data.vocab_size
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


def is_frozen(component: str, freeze) -> bool:
    return any(in_component(component, f) for f in freeze)


def _block_flops(s: P.Stack, t: int, rows: int, attention: bool = True) -> float:
    """Forward FLOPs of one block over t positions of which `rows` (the last ones) are computed through
    (keep_last): the others only feed keys and values (transformer) or the token mixing (mixer)."""
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
    m, vocab = plan.memory, plan.data.vocab_size
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
    enc_frozen = all(is_frozen(c, freeze) for c in params(plan) if c.startswith('encoder.'))
    return (3 * dec + (1 if enc_frozen else 3) * enc) / tokens


def kv_cache_bytes(plan: P.Plan) -> int:
    """KV cache of the decoder for one sequence at inference (fp32). Mixers keep no KV cache (0)."""
    dec = plan.decoder
    if dec.kind != 'transformer':
        return 0
    ctx = family(plan).lengths(plan)['decoder']
    return 2 * dec.n_layers * dec.kv_heads * (dec.d_model // dec.n_heads) * ctx * BYTES


def activation_bytes(plan: P.Plan, batch: int, freeze=()) -> int:
    """Saved activations for backward, per batch, fp32, for a clm pass (the family's main objective). Per block and
    position: transformer ~ 10 d + 4 ffn floats (norm in/out, q k v o, residuals, gate/up/act/product), mixer
    ~ 6 d + 2 ffn; logits 2 x vocab per predicted token; a frozen encoder with nothing trainable upstream saves
    nothing (no_grad)."""
    enc_frozen = all(is_frozen(c, freeze) for c in params(plan) if c.startswith('encoder.'))
    floats = 0
    for p in family(plan).work(plan, 'clm').passes:
        if p.stack == 'encoder' and enc_frozen:
            continue
        s = stack_of(plan, p.stack)
        per = (10 * s.d_model + 4 * s.ffn) if s.kind == 'transformer' else (6 * s.d_model + 2 * s.ffn)
        floats += batch * p.rows * (p.length * per * s.n_layers + p.head * 2 * plan.data.vocab_size)
    return int(floats * BYTES)


def stage_costs(plan: P.Plan) -> list[StageCost]:
    p = params(plan)
    out = []
    for s in plan.curriculum:
        frozen = sum(v for c, v in p.items() if is_frozen(c, s.freeze))
        flops = sum(flops_per_token(plan, s.freeze, True, o.kind) for o in s.objectives)  # one pass per objective
        out.append(StageCost(s.name, sum(p.values()) - frozen, frozen, flops,
                             activation_bytes(plan, s.batch_size or plan.data.batch_size, s.freeze)))
    return out


def training_flops(plan: P.Plan) -> float:
    """Total training FLOPs of the curriculum: steps x tokens per step x FLOPs per token, stage by stage."""
    tokens = plan.memory.chunks * plan.memory.chunk_len
    return sum(s.steps * (s.batch_size or plan.data.batch_size) * tokens * c.train_flops_per_token
               for s, c in zip(plan.curriculum, stage_costs(plan)))
