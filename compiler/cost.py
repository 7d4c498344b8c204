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
from compiler.validate import sequence_lengths

BYTES = 4  # fp32 on CPU (bf16 autocast on CPU is 15x slower here: DESIGN.md)


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


def params(plan: P.Plan, vocab: int | None = None) -> dict[str, int]:
    """{'encoder.embedding': n, ...} for every component of the plan's graph."""
    vocab = vocab or plan.data.vocab_size
    fam, m, lengths = plan.family, plan.memory, sequence_lengths(plan)
    out: dict[str, int] = {}
    dec_embedding = fam not in ('autoencoder', 'probe')
    for k, v in stack_params(plan.decoder, vocab, lengths['decoder'], dec_embedding, True).items():
        out[f'decoder.{k}'] = v
    if 'encoder' in lengths:
        for k, v in stack_params(plan.encoder, vocab, lengths['encoder'], True, False).items():
            out[f'encoder.{k}'] = v
    d_dec = plan.decoder.d_model
    d_enc = plan.encoder.d_model if 'encoder' in lengths else d_dec
    former = 'encoder' in lengths or fam == 'recurrent'
    if former and m.compression > 1:
        c = d_enc // m.compression
        out['memory.compress'] = d_enc * c + c + c * d_enc + d_enc
    if former and d_enc != d_dec:
        out['memory.proj'] = d_enc * d_dec
    from compiler.model import needs_ae_decoder
    ae = needs_ae_decoder(plan)
    if ae:
        for k, v in stack_params(plan.ae_decoder or plan.decoder, vocab, m.chunk_len, False, True).items():
            out[f'ae_decoder.{k}'] = v
    if (fam in ('autoencoder', 'probe') or ae) and m.decoder_input == 'unroll':
        out['memory.unroll'] = (d_dec // 2) * d_dec + d_dec
    if fam in P.MEMORY_FAMILIES and m.pad == 'learned':
        out['memory.pad'] = d_dec
    return out


def is_frozen(component: str, freeze) -> bool:
    return any(component == f or component.startswith(f + '.') for f in freeze)


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
    """(decoder side, encoder side) forward FLOPs of one example (N chunks of L tokens) for one objective pass,
    counting exactly the work the built graph does: memories read one encoder position (keep_last), the head
    runs on token positions only, copy objectives decode only the supervised second half, autoencode runs the
    (ae_)decoder over each chunk without memory slots."""
    fam, m = plan.family, plan.memory
    n, l, lengths, vocab = m.chunks, m.chunk_len, sequence_lengths(plan), plan.data.vocab_size
    dec = plan.decoder
    head = 2 * dec.d_model * vocab
    d_enc = plan.encoder.d_model if 'encoder' in lengths else dec.d_model
    form = (4 * d_enc * (d_enc // m.compression) if m.compression > 1 else 0) + (2 * d_enc * dec.d_model if d_enc != dec.d_model else 0)
    unroll = l * 2 * (dec.d_model // 2) * dec.d_model if m.decoder_input == 'unroll' else 0  # autoencoder decoder input
    first = n // 2 if objective in ('copy', 'blank_copy') else 0
    read = 2 if m.position == 'second_last' else 1  # encoder positions a memory needs from the last block
    if fam in ('clm', 'full_context'):
        return stack_flops(dec, n * l, (n - first) * l if first else None, attention) + (n - first) * l * head, 0.0
    if fam in ('autoencoder', 'probe'):
        return (n * (unroll + stack_flops(dec, l, None, attention) + l * head),
                n * (stack_flops(plan.encoder, l, read, attention) + form))
    if fam == 'recurrent':  # the carried memory reads the last position of every chunk's decoder pass
        return n * (stack_flops(dec, 1 + l, None, attention) + l * head + form), 0.0
    if objective == 'autoencode':  # memory model's stage-0 autoencoder: every chunk, through ae_decoder
        ae = plan.ae_decoder or dec
        return (n * (unroll + stack_flops(ae, l, None, attention) + l * head),
                n * (stack_flops(plan.encoder, l, read, attention) + form))
    decoder = (n - first) * (stack_flops(dec, lengths['decoder'], l, attention) + l * head)
    if fam == 'no_memory':
        return decoder, 0.0
    if fam == 'oracle':  # the encoder sees the whole sequence once, every position read (chunk windows)
        return decoder, stack_flops(plan.encoder, n * l, None, attention) + (n - 1) * form
    return decoder, (n - 1) * (stack_flops(plan.encoder, l, read, attention) + form)


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
    ctx = sequence_lengths(plan)['decoder']
    return 2 * dec.n_layers * dec.kv_heads * (dec.d_model // dec.n_heads) * ctx * BYTES


def activation_bytes(plan: P.Plan, batch: int, freeze=()) -> int:
    """Saved activations for backward, per batch, fp32. Per block and position: transformer ~ 10 d + 4 ffn
    floats (norm in/out, q k v o, residuals, gate/up/act/product), mixer ~ 6 d + 2 ffn; logits 2 x vocab per
    predicted token; a frozen encoder with nothing trainable upstream saves nothing (no_grad)."""
    lengths, m, fam = sequence_lengths(plan), plan.memory, plan.family

    def stack(s, t, rows):
        per = (10 * s.d_model + 4 * s.ffn) if s.kind == 'transformer' else (6 * s.d_model + 2 * s.ffn)
        return rows * t * per * s.n_layers

    n = m.chunks
    dec_rows = batch * (1 if fam in ('clm', 'full_context') else n)
    floats = stack(plan.decoder, lengths['decoder'], dec_rows) + batch * n * m.chunk_len * 2 * plan.data.vocab_size
    if 'encoder' in lengths and not all(is_frozen(c, freeze) for c in params(plan) if c.startswith('encoder.')):
        enc_rows = batch * (n if fam in ('autoencoder', 'probe') else 1 if fam == 'oracle' else n - 1)
        floats += stack(plan.encoder, lengths['encoder'], enc_rows)
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
