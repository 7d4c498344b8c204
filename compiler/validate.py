"""Cross-field checks of a Plan, before any tensor is allocated (nothing here imports torch). Each failure names
the binding that set the offending value (`where(owner, field)`, given by compiler.spec), says what is wrong and
how to fix it. What a family allows comes from its record in compiler/families.py."""
from __future__ import annotations

import re
from typing import Callable

from compiler import cost
from compiler import plan as P
from compiler.errors import SpecError, either
from compiler.families import family, in_component, serving

INIT_SOURCE = re.compile(r'^(fresh|previous|run:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(:[a-z_.]+)?|llama:.+)$')
# Sanity limits checked before the graph is built on the meta device: beyond them torch's size arithmetic overflows
# (a RuntimeError traceback) or building the module tree itself takes minutes (n_layers); found by spec fuzzing.
MAX_PARAMS = 10 ** 12
MAX_LAYERS = 1024


def check(plan: P.Plan, where: Callable[[object, str], str]) -> None:
    """Raise SpecError at the first problem; `where(owner, field)` names the binding that set owner.field."""

    def fail(owner, name, what, fix):
        raise SpecError(where(owner, name), what, fix)

    fam = family(plan)
    if fam.has_encoder and plan.encoder is None:
        fail(plan, 'encoder', f"family '{plan.family}' needs an encoder but Plan.encoder is not set",
             'bind Plan.encoder = @encoder/Stack() and its parameters')
    lengths = fam.lengths(plan)
    for role in ('encoder', 'decoder'):
        stack = getattr(plan, role)
        if stack is None or role not in lengths:
            continue
        _check_stack(stack, role, lengths[role], plan, fail)

    m = plan.memory
    if m.chunk_len < 2:
        fail(m, 'chunk_len', f'Memory.chunk_len = {m.chunk_len} is too short', 'use at least 2 tokens per chunk')
    if m.chunks < 1:
        fail(m, 'chunks', f'Memory.chunks = {m.chunks} must be positive', 'use at least 1 chunk')
    if m.chunks < fam.min_chunks:
        fail(m, 'chunks', f"family '{plan.family}' needs at least {fam.min_chunks} chunks "
             f'(memories of earlier chunks), got {m.chunks}', f'set Memory.chunks >= {fam.min_chunks}')
    if plan.encoder is not None and fam.has_encoder:
        if m.compression < 1 or plan.encoder.d_model % m.compression:
            fail(m, 'compression',
                 f'Memory.compression = {m.compression} does not divide encoder d_model {plan.encoder.d_model}',
                 'choose a compression factor that divides the encoder width')
    if m.noise < 0:
        fail(m, 'noise', f'Memory.noise = {m.noise} is negative', 'use 0 (off) or a positive amplitude such as 0.0625')
    if plan.ae_decoder is not None:
        _check_stack(plan.ae_decoder, 'ae_decoder', m.chunk_len, plan, fail)
        if plan.ae_decoder.d_model != plan.decoder.d_model:
            fail(plan.ae_decoder, 'd_model',
                 f'ae_decoder width {plan.ae_decoder.d_model} differs from decoder width {plan.decoder.d_model}; '
                 'both read the same memories',
                 'give ae_decoder the decoder\'s d_model')
    if not fam.token_decoder and m.decoder_input == 'unroll' and plan.decoder.d_model % 2:
        fail(m, 'decoder_input', f'unroll needs an even decoder width, got {plan.decoder.d_model}',
             "use decoder_input = 'repeat' or an even d_model")
    if m.slots == 'variable' and plan.decoder.kind == 'mixer' and fam.chunk_slots:
        fail(m, 'slots', 'variable memory slots need attention; a masked-mixer decoder has fixed positions',
             "use Memory.slots = 'fixed' with a mixer decoder")

    names = [s.name for s in plan.curriculum]
    if not plan.curriculum:
        fail(plan, 'curriculum', 'the curriculum has no stages', 'bind Plan.curriculum = [@stage0/Stage()]')
    d = plan.data  # before the graph is built: a negative vocabulary is a negative tensor dimension
    if d.batch_size < 1:
        fail(d, 'batch_size', f'Data.batch_size = {d.batch_size} must be >= 1', 'use a positive batch size')
    if not 0 < d.val_fraction < 1:
        fail(d, 'val_fraction', f'Data.val_fraction = {d.val_fraction} must be between 0 and 1', 'use e.g. 0.05')
    if d.vocab_size < 2:
        fail(d, 'vocab_size', f'Data.vocab_size = {d.vocab_size} is too small', 'use e.g. 2048')
    _check_size(plan, fail)
    comps = cost.components(plan)
    for i, stage in enumerate(plan.curriculum):
        if stage.name in names[:i]:  # report the later duplicate: usually the line just written
            fail(stage, 'name', f"two curriculum stages are named '{stage.name}'",
                 'give every stage a unique Stage.name')
        _check_stage(stage, plan, comps, fail)

    r = plan.run
    for name in ('checkpoint_every', 'log_every', 'eval_batches'):
        if getattr(r, name) < 1:
            fail(r, name, f'Run.{name} = {getattr(r, name)} must be >= 1', f'use a positive Run.{name}')


def _check_size(plan: P.Plan, fail) -> None:
    """Refuse plans too large to build (analytic parameter count, before any module exists)."""
    p = cost.params(plan)
    total = sum(p.values())
    if total <= MAX_PARAMS:
        return
    big = max(p, key=p.get)
    role, part = big.split('.', 1)
    stack = getattr(plan, role, None) if role in ('encoder', 'decoder', 'ae_decoder') else None
    owner, name = ((plan.data, 'vocab_size') if part in ('embedding', 'head')
                   else (stack, 'd_model') if stack is not None else (plan.decoder, 'd_model'))
    fail(owner, name,
         f'the plan has {total:.3g} parameters (largest: {big} {p[big]:.3g}), more than the limit {MAX_PARAMS:.0e}',
         'use a smaller d_model, n_layers, vocab_size or (masked mixer) chunk_len')


def _check_stack(s: P.Stack, role: str, length: int, plan: P.Plan, fail) -> None:
    for name in ('d_model', 'n_layers', 'n_heads', 'mixer_kernel', 'mixer_heads'):
        if getattr(s, name) < 1:
            fail(s, name, f'{role} Stack.{name} = {getattr(s, name)} must be >= 1', f'use a positive {name}')
    if s.n_layers > MAX_LAYERS:
        fail(s, 'n_layers', f'{role} Stack.n_layers = {s.n_layers} is more than the limit {MAX_LAYERS}',
             'use fewer layers')
    if s.n_kv_heads is not None and s.n_kv_heads < 1:
        fail(s, 'n_kv_heads', f'{role} Stack.n_kv_heads = {s.n_kv_heads} must be >= 1',
             'use None (= n_heads) or a divisor of n_heads')
    if s.kind == 'transformer':
        if s.d_model % s.n_heads:
            h = _divisor(s.d_model, s.n_heads)
            fail(s, 'n_heads', f'{role} d_model {s.d_model} is not divisible by n_heads {s.n_heads}',
                 f'choose n_heads dividing {s.d_model} (e.g. {h})' if h else
                 f'd_model {s.d_model} is odd and rotary positions need an even head dim: use an even d_model')
        if (s.d_model // s.n_heads) % 2:
            fail(s, 'n_heads',
                 f'{role} head dim {s.d_model // s.n_heads} is odd; rotary positions need an even head dim',
                 'choose n_heads so that d_model / n_heads is even')
        if s.n_heads % s.kv_heads:
            fail(s, 'n_kv_heads', f'{role} n_heads {s.n_heads} is not a multiple of n_kv_heads {s.kv_heads}',
                 'choose n_kv_heads dividing n_heads')
        if s.attention == 'xformers' and plan.run.device == 'cpu':
            fail(s, 'attention',
                 f"{role} Stack.attention = 'xformers' but Run.device = 'cpu': xformers has no CPU kernels",
                 "use Stack.attention = 'auto' (sdpa on CPU, xformers on CUDA) or 'sdpa'")
    elif s.d_model % s.mixer_heads:
        fail(s, 'mixer_heads', f'{role} d_model {s.d_model} is not divisible by mixer_heads {s.mixer_heads}',
             f'choose mixer_heads dividing {s.d_model}')
    if s.context is not None and length > s.context:
        fail(plan.memory, 'chunk_len',
             f'{role} sees {length} positions per sequence ({_layout(plan)}) but its context is {s.context}',
             'use fewer or shorter chunks, or a stack with a longer context')
    if s.rope_theta <= 0 or s.norm_eps <= 0:
        name = 'rope_theta' if s.rope_theta <= 0 else 'norm_eps'
        fail(s, name, f'{role} Stack.{name} = {getattr(s, name)} must be positive', 'use the defaults (1e4 and 1e-6)')
    if s.ffn_hidden is not None and s.ffn_hidden < 1:
        fail(s, 'ffn_hidden', f'{role} ffn_hidden = {s.ffn_hidden} must be >= 1', 'use e.g. 4 * d_model or None')


def _layout(plan) -> str:
    m = plan.memory
    return f'{plan.family}: {m.chunks} chunks x {m.chunk_len} tokens, {m.slots} slots'


def _divisor(d: int, near: int) -> int | None:
    """A head count near `near` that divides d into even head dims, searched among small counts (d may be huge:
    a search up to d took a minute for d_model = 999999998); None when there is none (odd d)."""
    found = [h for h in range(1, min(d, 4096) + 1) if d % h == 0 and (d // h) % 2 == 0]
    return min(found, key=lambda h: abs(h - near)) if found else None


def _check_stage(stage: P.Stage, plan: P.Plan, comps: list[str], fail) -> None:
    tag = f"stage '{stage.name}'"
    if stage.steps < 1:
        fail(stage, 'steps', f'{tag} has {stage.steps} steps', 'give every stage at least 1 step (or remove it)')
    if stage.lr <= 0:
        fail(stage, 'lr', f'{tag} learning rate {stage.lr} must be positive', 'use e.g. 1e-3')
    if stage.warmup < 0:  # warmup >= steps is allowed: a shortened smoke-test run simply never leaves warmup
        fail(stage, 'warmup', f'{tag} warmup {stage.warmup} is negative', 'use 0 (no warmup) or a positive step count')
    if stage.eval_every < 1:
        fail(stage, 'eval_every', f'{tag} eval_every must be >= 1', 'use e.g. 100')
    if stage.batch_size is not None and stage.batch_size < 1:
        fail(stage, 'batch_size', f'{tag} batch_size must be >= 1', 'use a positive batch size or None')
    if stage.micro_batch is not None and stage.micro_batch < 1:
        fail(stage, 'micro_batch', f'{tag} micro_batch must be >= 1',
             'use a positive number of rows or None (whole batch)')
    if stage.micro_batch is not None and any(o.kind == 'retrieval' for o in stage.objectives):
        fail(stage, 'micro_batch', f'{tag} has a retrieval objective, whose negatives are the other rows of the batch: '
             'micro-batches would silently shrink them', 'leave micro_batch = None for stages with retrieval')
    if not stage.objectives:
        fail(stage, 'objectives', f'{tag} has no objectives', "bind Stage.objectives = [@clm/Objective()]")
    for c in stage.freeze:
        if c not in comps:
            fail(stage, 'freeze', f"{tag} freezes '{c}', which the '{plan.family}' graph does not have",
                 'freeze one of: ' + ', '.join(comps))
    if set(comps) and all(any(in_component(c, f) for f in stage.freeze) for c in comps if '.' in c):
        fail(stage, 'freeze', f'{tag} freezes every component: nothing would train',
             'leave at least one component trainable')
    for c, src in stage.init_from.items():
        if c not in comps:
            fail(stage, 'init_from', f"{tag} initialises '{c}', which the '{plan.family}' graph does not have",
                 'use one of: ' + ', '.join(comps))
        if src.startswith('llama:') and c not in ('decoder', 'encoder'):
            fail(stage, 'init_from', f"{tag}: a Llama checkpoint initialises a whole stack, not '{c}'",
                 "use {'decoder': 'llama:<path>'} (or 'encoder')")
        if not INIT_SOURCE.match(src):
            fail(stage, 'init_from', f"{tag}: init source {src!r} for '{c}' is not understood",
                 "use 'fresh', 'previous', 'run:<run id>/<stage name>[:<component>]' "
                 "or 'llama:<checkpoint dir or file>'")
    kinds = [o.kind for o in stage.objectives]
    for o in stage.objectives:
        _check_objective(o, tag, plan, fail)
    if stage.normalize == 'faithful' and sorted(set(kinds)) not in (['clm', 'copy'], ['blank_copy', 'clm']):
        fail(stage, 'normalize',
             f"{tag}: 'faithful' reproduces clm_mean + 0.5 * copy_mean and needs exactly clm and one copy objective, "
             f'got {kinds}',
             "use normalize = 'weighted_sum'")


def _check_objective(o: P.Objective, tag: str, plan: P.Plan, fail) -> None:
    m, fam = plan.memory, plan.family
    if o.weight < 0:
        fail(o, 'weight', f'{tag}: objective {o.kind} has negative weight {o.weight}', 'use a weight >= 0')
    if o.kind not in family(plan).objectives:
        if o.kind == 'autoencode':
            fail(o, 'kind', f"{tag}: objective 'autoencode' needs an encoder ({either(serving('autoencode'))} family), "
                 f"the plan is '{fam}'", "use Plan.family = 'autoencoder', or a clm/copy objective")
        if o.kind == 'retrieval':
            fail(o, 'kind', f"{tag}: retrieval compares encoder embeddings; family '{fam}' has no encoder",
                 'use a family with an encoder')
        fail(o, 'kind', f"{tag}: objective '{o.kind}' needs a causal decoder; the '{fam}' family regenerates its input",
             "use objective kind 'autoencode'")
    if o.kind in ('copy', 'blank_copy'):
        if m.chunks < 2 or m.chunks % 2:
            fail(m, 'chunks',
                 f"{tag}: objective '{o.kind}' copies the first half of the chunks into the second and needs "
                 f'an even number >= 2 of chunks, got {m.chunks}',
                 'set Memory.chunks to 2, 4, 8, ...')
        if not 0 <= o.delimiter < m.chunk_len:
            fail(o, 'delimiter', f'{tag}: {o.delimiter} delimiter tokens do not fit a chunk of {m.chunk_len}',
                 'use 0 or 3')
    if o.kind == 'retrieval':
        if not 1 <= o.ngram <= m.chunk_len:
            fail(o, 'ngram', f'{tag}: retrieval ngram {o.ngram} must be in [1, chunk_len={m.chunk_len}]', 'use e.g. 7')
        if o.temperature <= 0:
            fail(o, 'temperature', f'{tag}: retrieval temperature must be positive', 'use e.g. 0.02')
