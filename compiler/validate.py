"""Checks of a Plan, before any tensor is allocated (nothing here imports torch). Each failure names the binding that
set the offending value (`where(owner, field)`, given by compiler.spec), says what is wrong and how to fix it. What a
family allows comes from its record in compiler/families.py.

- RULES: the range of every numeric field of every Plan dataclass (tests/test_spec_values.py proves each one refuses
  an out-of-range value), checked first so the cross-field checks can rely on sane numbers;
- NAMES: fields used as file or group names must be identifiers;
- check(): ranges, names, then cross-field checks; raises SpecError at the first problem;
- warnings(): questionable but legal values (SpecWarning: listed in the compile report and the run record)."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable

from compiler import cost
from compiler import plan as P
from compiler.errors import SpecError, either
from compiler.families import family, serving
from compiler.objective_registry import faithful_pair, objective

# run sources may name a component of the source run, or a block range of it ('...:encoder.layers.0-7')
INIT_SOURCE = re.compile(r'^(fresh|previous|run:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(:[a-z_.]+(\.[0-9]+-[0-9]+)?)?'
                         r'|llama:.+)$')
# Sanity limits checked before the graph is built on the meta device: beyond them torch's size arithmetic overflows
# (a RuntimeError traceback) or building the module tree itself takes minutes (n_layers); found by spec fuzzing.
MAX_PARAMS = 10 ** 12
MAX_LAYERS = 1024
MAX_VOCAB = 262144  # beyond the largest vocabularies in use: a warning, not an error
SEED_MAX = 2 ** 32 - 1  # numpy's and torch's seeds
IDENTIFIER = P.NAME


@dataclass(frozen=True)
class Rule:
    """The values a numeric field accepts: lo <= v <= hi (strict where open); floats must be finite. A None value
    (an optional field left unset) is not checked."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    fix: str = ''

    def accepts(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        return f"{'>' if self.lo_open else '>='} {self.lo}"


def _at_least(lo, fix):
    return Rule(lo, fix=fix)


def _positive(fix):
    return Rule(0, lo_open=True, fix=fix)


RULES: dict[type, dict[str, Rule]] = {
    P.Stack: {
        'd_model': _at_least(1, 'use a positive width such as 128'),
        'n_layers': Rule(1, MAX_LAYERS, fix=f'use between 1 and {MAX_LAYERS} layers'),
        'n_heads': _at_least(1, 'use a positive head count dividing d_model'),
        'n_kv_heads': _at_least(1, 'use None (= n_heads) or a divisor of n_heads'),
        'ffn_hidden': _at_least(1, 'use e.g. 4 * d_model, or None'),
        'mixer_kernel': _at_least(1, 'use 1 (the research code) or a small kernel'),
        'mixer_heads': _at_least(1, 'use 1, or a head count dividing d_model'),
        'rope_theta': _positive('use the default 1e4 (Llama 3: 5e5)'),
        'norm_eps': _positive('use the default 1e-6'),
        'context': _at_least(1, "use None (any length) or the positions the stack supports"),
    },
    P.Backbone: {},
    P.Lora: {
        'r': _at_least(1, 'use a rank such as 8'),
        'alpha': _positive('use e.g. 16 (twice the rank)'),
        'dropout': Rule(0, 1, hi_open=True, fix='use 0 (off) or e.g. 0.05'),
    },
    P.Memory: {
        'chunks': _at_least(1, 'use at least 1 chunk'),
        'chunk_len': _at_least(2, 'use at least 2 tokens per chunk'),
        'compression': _at_least(1, 'use 1 (no bottleneck) or a factor dividing the encoder width'),
        'noise': _at_least(0, 'use 0 (off) or a positive amplitude such as 0.0625'),
    },
    P.Objective: {
        'weight': _at_least(0, 'use a weight >= 0'),
        'delimiter': _at_least(0, 'use 0 or 3 (the research code)'),
        'temperature': _positive('use e.g. 0.02'),
        'ngram': _at_least(1, 'use e.g. 7'),
    },
    P.Stage: {
        'steps': _at_least(1, 'give every stage at least 1 step (or remove it)'),
        'lr': _positive('use e.g. 1e-3'),
        'warmup': _at_least(0, 'use 0 (no warmup) or a positive step count'),
        'min_lr_ratio': Rule(0, 1, fix='use a fraction of Stage.lr such as 0.1'),
        'weight_decay': _at_least(0, 'use 0 (off) or e.g. 0.1'),
        'batch_size': _at_least(1, 'use a positive number of rows, or None (Data.batch_size)'),
        'micro_batch': _at_least(1, 'use a positive number of rows or None (whole batch)'),
        'eval_every': _at_least(1, 'use e.g. 100'),
    },
    P.Data: {
        'vocab_size': _at_least(2, 'use e.g. 2048'),
        'val_fraction': Rule(0, 1, True, True, 'use e.g. 0.05'),
        'batch_size': _at_least(1, 'use a positive batch size'),
        'max_documents': _at_least(1, 'use None (every document) or a positive count'),
    },
    P.Run: {
        'seed': Rule(0, SEED_MAX, fix=f'use a seed in [0, {SEED_MAX}]'),
        'checkpoint_every': _at_least(1, 'use a positive Run.checkpoint_every'),
        'log_every': _at_least(1, 'use a positive Run.log_every'),
        'eval_batches': _at_least(1, 'use a positive Run.eval_batches'),
        'steps_scale': _positive('use e.g. 0.01 for a smoke test, 1 for the spec as written'),
    },
    P.Plan: {},
}
# fields used as names: (field, why it must be an identifier)
NAMES = {P.Stage: ('name', 'it names the stage weights file (stages/<name>.safetensors) and memory-store group'),
         P.Run: ('name', 'it labels the run record and its reports')}


@dataclass(frozen=True)
class SpecWarning:
    """A questionable but legal value, or a binding with no effect in this plan: listed in the compile report and
    the run record, never fatal."""
    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f'{self.where}: {self.what}\n  fix: {self.fix}'


def _parts(plan: P.Plan):
    """(owner, label) of every part of the plan; the label prefixes messages ('decoder ', "stage 'x': ")."""
    yield plan, ''
    for role in P.STACK_ROLES:
        stack = getattr(plan, role)
        if stack is not None:
            yield stack, f'{role} '
        if isinstance(stack, P.Backbone) and stack.lora is not None:
            yield stack.lora, f'{role} '
    yield plan.memory, ''
    yield plan.data, ''
    yield plan.run, ''
    for stage in plan.curriculum:
        yield stage, f"stage '{stage.name}': "
        for o in stage.objectives:
            yield o, f"stage '{stage.name}' objective '{o.kind}': "


def check_values(plan: P.Plan, where: Callable[[object, str], str]) -> None:
    """Every numeric field in its range (RULES), every name an identifier (NAMES)."""
    for owner, label in _parts(plan):
        cls = type(owner)
        for name, rule in RULES[cls].items():
            v = getattr(owner, name)
            if v is None or rule.accepts(v):
                continue
            what = (f'{label}{cls.__name__}.{name} = {v} is not a finite number' if isinstance(v, float)
                    and not math.isfinite(v) else f'{label}{cls.__name__}.{name} must be {rule.describe()}, got {v!r}')
            raise SpecError(where(owner, name), what, rule.fix)
        name, why = NAMES.get(cls, (None, ''))
        if name and not IDENTIFIER.match(getattr(owner, name)):
            raise SpecError(where(owner, name), f'{cls.__name__}.{name} = {getattr(owner, name)!r} is not an '
                            f'identifier, and {why}',
                            'use letters, digits and underscores, not starting with a digit, at most 64 characters '
                            "(e.g. 'blank_copy')")


def check(plan: P.Plan, where: Callable[[object, str], str]) -> None:
    """Raise SpecError at the first problem; `where(owner, field)` names the binding that set owner.field."""

    def fail(owner, name, what, fix):
        raise SpecError(where(owner, name), what, fix)

    check_values(plan, where)
    from compiler.pretrained import check_backbones
    check_backbones(plan, fail)
    _check_stacks(plan, fail)
    _check_memory(plan, fail)
    names = [s.name for s in plan.curriculum]
    if not plan.curriculum:
        fail(plan, 'curriculum', 'the curriculum has no stages', 'bind Plan.curriculum = [@stage0/Stage()]')
    _check_size(plan, fail)
    comps = cost.components(plan)
    for i, stage in enumerate(plan.curriculum):
        if stage.name in names[:i]:  # report the later duplicate: usually the line just written
            fail(stage, 'name', f"two curriculum stages are named '{stage.name}'",
                 'give every stage a unique Stage.name')
        _check_stage(stage, plan, comps, fail)


def _check_stacks(plan: P.Plan, fail) -> None:
    """The stacks the family has, each against the sequence length it sees."""
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


def _check_memory(plan: P.Plan, fail) -> None:
    """The chunk layout and the memory against the family and its stacks (the ae_decoder's stack too)."""
    fam, m = family(plan), plan.memory
    if m.chunks < fam.min_chunks:
        fail(m, 'chunks', f"family '{plan.family}' needs at least {fam.min_chunks} chunks "
             f'(memories of earlier chunks), got {m.chunks}', f'set Memory.chunks >= {fam.min_chunks}')
    if plan.encoder is not None and fam.has_encoder and plan.encoder.d_model % m.compression:
        fail(m, 'compression',
             f'Memory.compression = {m.compression} does not divide encoder d_model {plan.encoder.d_model}',
             'choose a compression factor that divides the encoder width')
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
    _check_combine(plan, fail)
    if m.slots == 'variable' and plan.decoder.kind == 'mixer' and fam.chunk_slots:
        fail(m, 'slots', 'variable memory slots need attention; a masked-mixer decoder has fixed positions',
             "use Memory.slots = 'fixed' with a mixer decoder")


def _check_combine(plan: P.Plan, fail) -> None:
    """Memory.combine: how one memory enters a full-context decoder (families that combine one memory only)."""
    fam, m = family(plan), plan.memory
    if m.combine != 'token' and not fam.combines:
        fail(m, 'combine', f"Memory.combine = '{m.combine}' has no meaning for family '{plan.family}': its "
             'memories sit in slots before each chunk',
             "use Plan.family = 'sequence_oracle', or leave Memory.combine = 'token'")
    if m.combine == 'concat' and m.compression != 1:
        fail(m, 'compression', "Memory.combine = 'concat' concatenates the encoder's hidden state as it is",
             'use Memory.compression = 1')
    if m.combine == 'concat' and plan.encoder is not None and plan.decoder.d_model <= plan.encoder.d_model:
        fail(plan.decoder, 'd_model', f"Memory.combine = 'concat': the decoder width {plan.decoder.d_model} holds "
             f'the memory ({plan.encoder.d_model} wide) and the token embedding, so it must be larger',
             f'use decoder d_model = token width + {plan.encoder.d_model} (the research code: 2 x d)')


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
    if isinstance(s, P.Backbone):
        pass  # checked by compiler.pretrained.check_backbones
    elif s.kind == 'transformer':
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
    contrast = [o.kind for o in stage.objectives if objective(o).batch_negatives]
    if stage.micro_batch is not None and contrast:
        fail(stage, 'micro_batch', f'{tag} has a {contrast[0]} objective, whose negatives are the other rows of the '
             'batch: micro-batches would silently shrink them',
             f'leave micro_batch = None for stages with {contrast[0]}')
    if not stage.objectives:
        fail(stage, 'objectives', f'{tag} has no objectives', "bind Stage.objectives = [@clm/Objective()]")
    _check_freeze(stage, tag, plan, comps, fail)
    _check_init_from(stage, tag, plan, comps, fail)
    _check_mixture(stage, tag, plan, fail)


def _check_freeze(stage: P.Stage, tag: str, plan: P.Plan, comps: list[str], fail) -> None:
    from compiler.pretrained import freeze_problem
    for c in stage.freeze:
        if c not in comps:
            problem = freeze_problem(plan, c)
            if problem is not None:
                fail(stage, 'freeze', f"{tag} freezes '{c}', {problem}",
                     P.did_you_mean(c, comps) + 'freeze one of: ' + ', '.join(comps)
                     + ', <stack>.layers.I or <stack>.layers.I-J (blocks I to J), and for a backbone <role>.base '
                       '(its pretrained weights) or <role>.lora (its adapters)')
    freeze = cost.effective_freeze(plan, stage.freeze)
    if set(comps) and all(cost.is_frozen(c, freeze) for c in comps if '.' in c):
        fail(stage, 'freeze', f'{tag} freezes every component: nothing would train',
             'leave at least one component trainable')


def _check_init_from(stage: P.Stage, tag: str, plan: P.Plan, comps: list[str], fail) -> None:
    for c, src in stage.init_from.items():
        from compiler.pretrained import freeze_problem
        problem = None if c in comps else freeze_problem(plan, c)  # a block range names blocks, as in Stage.freeze
        if problem is not None:
            fail(stage, 'init_from', f"{tag} initialises '{c}', {problem}",
                 P.did_you_mean(c, comps) + 'use one of: ' + ', '.join(comps)
                 + ', <stack>.layers.I or <stack>.layers.I-J (blocks I to J)')
        if src.startswith('llama:') and isinstance(getattr(plan, c, None), P.Backbone):
            fail(stage, 'init_from', f"{tag}: the {c} is a Backbone, which loads its own weights; 'llama:' converts a "
                 'checkpoint into a memspec Stack', f'remove the init_from entry (or point {c}/Backbone.source at it)')
        if src.startswith('llama:') and c not in ('decoder', 'encoder'):
            fail(stage, 'init_from', f"{tag}: a Llama checkpoint initialises a whole stack, not '{c}'",
                 "use {'decoder': 'llama:<path>'} (or 'encoder')")
        if not INIT_SOURCE.match(src):
            fail(stage, 'init_from', f"{tag}: init source {src!r} for '{c}' is not understood",
                 "use 'fresh', 'previous', 'run:<run id>/<stage name>[:<component>]' "
                 "or 'llama:<checkpoint dir or file>'")


def _check_mixture(stage: P.Stage, tag: str, plan: P.Plan, fail) -> None:
    """The stage's objectives, each against its record, and how their losses combine."""
    kinds = [o.kind for o in stage.objectives]
    for o in stage.objectives:
        _check_objective(o, tag, plan, fail)
    if stage.normalize == 'weighted_sum' and all(o.weight == 0 for o in stage.objectives):
        fail(stage.objectives[-1], 'weight', f'{tag}: every objective has weight 0: nothing would train',
             'give at least one objective a positive weight')
    if stage.normalize == 'faithful' and not faithful_pair(kinds):
        fail(stage, 'normalize',
             f"{tag}: 'faithful' reproduces clm_mean + 0.5 * copy_mean and needs exactly clm and one copy objective, "
             f'got {kinds}',
             "use normalize = 'weighted_sum'")


def _check_objective(o: P.Objective, tag: str, plan: P.Plan, fail) -> None:
    """What the objective's record (compiler/objective_registry.py) needs: a family that serves it, then its own
    checks of the plan."""
    kind = objective(o)
    if not family(plan).serves(kind):
        what, fix = kind.refusal
        fail(o, 'kind', what.format(tag=tag, kind=o.kind, family=plan.family, serving=either(serving(o.kind))), fix)
    problem = kind.problem(o, plan, tag)
    if problem is not None:
        fail(*problem)


def machine_memory() -> int:
    """Bytes of RAM of this machine."""
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def warnings(plan: P.Plan, where: Callable[[object, str], str], memory: int | None = None,
             devices: int = 1) -> list[SpecWarning]:
    """Questionable but legal values of a checked plan. `memory`: bytes the activations of one forward pass must fit
    (default: this machine's RAM); `devices`: processes the batch is split over (torchrun)."""
    out = []

    def warn(owner, name, what, fix):
        out.append(SpecWarning(where(owner, name), what, fix))

    for stage in plan.curriculum:
        tag = f"stage '{stage.name}'"
        if stage.warmup > stage.steps:
            warn(stage, 'warmup', f'{tag}: warmup {stage.warmup} is longer than the stage ({stage.steps} steps): '
                 f'the learning rate never reaches Stage.lr = {stage.lr:g}',
                 'shorten the warmup or lengthen the stage (Run.steps_scale scales both)')
        if stage.eval_every > stage.steps:
            warn(stage, 'eval_every', f'{tag}: eval_every {stage.eval_every} is more than its {stage.steps} steps: '
                 'only the stage-end evaluation runs', f'set eval_every <= {stage.steps}')
        if stage.lr >= 1:
            warn(stage, 'lr', f'{tag}: learning rate {stage.lr:g} is >= 1, where AdamW diverges',
                 'use e.g. 1e-3')
        if stage.micro_batch is not None and stage.micro_batch >= plan.batch_rows(stage):
            warn(stage, 'micro_batch', f'{tag}: micro_batch {stage.micro_batch} is not smaller than the batch '
                 f'({plan.batch_rows(stage)} rows): it has no effect', 'use fewer rows, or None')
    if plan.data.vocab_size > MAX_VOCAB:
        warn(plan.data, 'vocab_size', f'Data.vocab_size = {plan.data.vocab_size} is beyond {MAX_VOCAB}, larger than '
             'the vocabularies of current language models', 'use e.g. 8192 (paper scale) or 32000')
    _warn_activation_memory(plan, memory if memory is not None else machine_memory(), devices, warn)
    from compiler.tokens import backbones
    if backbones(plan) and not where(plan.data, 'vocab_size').endswith('(default)'):
        warn(plan.data, 'vocab_size', f'Data.vocab_size = {plan.data.vocab_size} has no effect: the vocabulary is the '
             f'backbone\'s ({backbones(plan)[0][1].source})', 'remove the binding')
    _warn_precision(plan.run, warn)
    return out


# Run.precision on a device where it is slow; Run.device = 'auto' is judged when the run starts (runtime/step.py)
CPU_PRECISION = {
    'bf16': ('bf16 autocast on the CPU is often slower than fp32 (its casts cost more than its products save '
             'without AMX; measure with benchmarks/train_throughput.py --precision fp32 bf16)',
             "use Run.precision = 'fp32' on the CPU, 'bf16' on a GPU"),
    'fp16': ('fp16 autocast on the CPU has fast kernels only with AVX512-FP16 or AMX-FP16, and fp16 needs loss '
             'scaling that bf16 does not', "use Run.precision = 'fp32' on the CPU; fp16 is for GPUs without bf16"),
}


def _warn_precision(run: P.Run, warn) -> None:
    if run.device == 'cpu' and run.precision in CPU_PRECISION:
        what, fix = CPU_PRECISION[run.precision]
        warn(run, 'precision', f"Run.precision = '{run.precision}' with Run.device = 'cpu': {what}", fix)


def _warn_activation_memory(plan: P.Plan, memory: int, devices: int, warn) -> None:
    """One warning for the stages whose activations of one forward pass (cost.activation_bytes: the micro-batch, or
    this process's share of the batch) exceed `memory`."""
    rows = {s.name: -(-plan.batch_rows(s) // devices) for s in plan.curriculum}
    need = {s.name: (cost.activation_bytes(plan, min(s.micro_batch or rows[s.name], rows[s.name]), s.freeze), s)
            for s in plan.curriculum}
    over = {name: b for name, (b, _) in need.items() if b > memory}
    if not over:
        return
    worst = max(over, key=over.get)
    stage = need[worst][1]
    owner, name = (stage, 'micro_batch') if stage.micro_batch else \
        (stage, 'batch_size') if stage.batch_size else (plan.data, 'batch_size')
    rows = rows[worst]
    warn(owner, name, f'activation memory estimated at {over[worst] / 2 ** 30:.1f} GiB per forward pass '
         f"(stage{'s' if len(over) > 1 else ''} {', '.join(repr(n) for n in over)}; "
         f"{min(stage.micro_batch or rows, rows)} rows{f' per device of {devices}' if devices > 1 else ''}) "
         f'is more than the {memory / 2 ** 30:.1f} GiB of RAM of this machine',
         'split each batch with Stage.micro_batch (gradients accumulate) or over devices '
         '(torchrun; python -m compiler --devices N), or use a smaller batch')
