"""The Plan: frozen dataclasses that describe one experiment.

Gin is only the surface syntax. Each dataclass below is registered as a gin configurable under its own
name (`Stack`, `Memory`, `Objective`, `Stage`, `Data`, `Run`, `Plan`), so a spec writes
`encoder/Stack.n_layers = 2`. Everything downstream (validation, cost model, graph builder, runtime,
recorder) reads the Plan, never the gin text.

Every instance remembers the gin scope it was built in (`encoder/Stack` -> scope 'encoder'), so a bad
value can be traced back to the file and line that bound it (see compiler/spec.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field

import gin

from compiler.families import NAMES as FAMILIES
from compiler.objective_registry import NAMES as OBJECTIVES

STACK_ROLES = ('decoder', 'encoder', 'ae_decoder')  # the Plan fields that hold a Stack (or a Backbone)
# A name that becomes a file or group name (Stage.name: stages/<name>.safetensors, a memory-store group; Run.name):
# an identifier cannot name a path outside the run's folder. The one definition, for the validator and store.layout.
NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,63}$')
INT_LIMIT = 2 ** 63  # every integer of a plan must fit int64


class PlanError(Exception):
    """A value in the plan is wrong. `owner` is the dataclass instance, `name` the offending field."""

    def __init__(self, owner, name: str, message: str, fix: str):
        super().__init__(message)
        self.owner, self.name, self.message, self.fix = owner, name, message, fix


def _check_types(obj) -> None:
    """Type-check the fields of a plan dataclass against their annotations (gin passes anything)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name == 'scope':
            continue
        value = getattr(obj, f.name)
        if not _conforms(value, hints[f.name]):
            raise PlanError(obj, f.name, f'{type(obj).__name__}.{f.name} = {value!r} is not {_describe(hints[f.name])}',
                            _misspelt_choice(value, hints[f.name])
                            + f'bind {type(obj).__name__}.{f.name} to {_describe(hints[f.name])}')
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= INT_LIMIT:
            # torch, numpy and the cost model's float arithmetic overflow beyond int64 (fuzzing found tracebacks)
            raise PlanError(obj, f.name, f'{type(obj).__name__}.{f.name} = {value} is too large (the limit is 2**63)',
                            f'bind {type(obj).__name__}.{f.name} to a realistic value')


def _conforms(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items())
    return _is_scalar(value, tp)


def _is_scalar(value, tp) -> bool:
    """None, a number (a bool is neither an int nor a float here) or an instance of a class."""
    if tp is type(None):
        return value is None
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _choices(tp) -> tuple:
    """The fixed choices a type allows (Literal values, through Optional/Union, tuples and dict values)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return args
    return tuple(c for a in args if a is not Ellipsis for c in _choices(a)) if args else ()


def did_you_mean(value, choices) -> str:
    """"did you mean 'blank_copy'? " when `value` is a near miss of one of `choices` (else ''): every field with a
    fixed set of choices says it."""
    close = difflib.get_close_matches(value, [c for c in choices if isinstance(c, str)], n=1, cutoff=0.6) \
        if isinstance(value, str) else []
    return f'did you mean {close[0]!r}? ' if close else ''


def _misspelt_choice(value, tp) -> str:
    """did_you_mean for the first wrong choice in a value (itself, an item, or a dict key or value)."""
    choices = [c for c in _choices(tp) if isinstance(c, str)]
    items = [*value, *value.values()] if isinstance(value, dict) else \
        list(value) if isinstance(value, (list, tuple)) else [value]
    for v in items:
        if isinstance(v, str) and v not in choices and did_you_mean(v, choices):
            return did_you_mean(v, choices)[:-2] + (f' (for {v!r})? ' if len(items) > 1 else '? ')
    return ''


_PLURAL = {int: 'integers', float: 'numbers', str: 'strings', bool: 'True/False values'}


def _plural(tp) -> str:
    """What the items of a list are, in the plural: 'strings', 'lists of integers', "values from 'a', 'b'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _PLURAL:
        return _PLURAL[tp]
    if origin is typing.Literal:
        return 'values from ' + ', '.join(repr(a) for a in args)
    if origin is tuple:
        return f'lists of {_plural(args[0])}'
    return f'items that are each {_describe(tp)}'


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return 'one of ' + ', '.join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return ' or '.join(_describe(a) for a in args)
    if origin is tuple:
        return f'a list of {_plural(args[0])}'
    if origin is dict:
        return f'a dict of {_plural(args[0])} -> {_plural(args[1])}'
    if tp is type(None):
        return 'None'
    return {int: 'an integer', float: 'a number', str: 'a string',
            bool: 'True or False'}.get(tp, f'a {getattr(tp, "__name__", tp)}')


class _PlanPart:
    """Shared post-init: record the gin scope, freeze lists into tuples, type-check."""

    def __post_init__(self):
        if not self.scope:
            object.__setattr__(self, 'scope', gin.current_scope_str())
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
        _check_types(self)
        for name, tp in typing.get_type_hints(type(self)).items():
            v = getattr(self, name)
            if tp is float and isinstance(v, int) and not isinstance(v, bool):
                # `lr = 1` and `lr = 1.0` are one experiment: one JSON value, one plan hash
                object.__setattr__(self, name, float(v))

    # fields added after plans were first recorded: left out of to_dict() (so out of the plan hash) while they hold
    # their default, so every plan written before them keeps its hash and a run recorded before them still resumes
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == 'scope':
                continue
            v = getattr(self, f.name)
            if f.name in self.LATER_FIELDS and v == (f.default_factory() if f.default is dataclasses.MISSING
                                                     else f.default):
                continue
            if isinstance(v, _PlanPart):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [x.to_dict() if isinstance(x, _PlanPart) else x for x in v]
            out[f.name] = v
        return out


_SCOPE = field(default='', compare=False, repr=False)


@dataclass(frozen=True)
class Stack(_PlanPart):
    """One stack of blocks (an encoder or a decoder): token embedding -> n_layers blocks -> final norm."""
    d_model: int = 128  # width of the residual stream (embeddings, hidden states; memories unless compressed)
    n_layers: int = 2  # blocks in the stack
    kind: typing.Literal['transformer', 'mixer'] = 'transformer'  # attention blocks, or masked-mixer blocks
    causal: bool = True  # each position sees only earlier ones (decoders); False: bidirectional (encoders)
    n_heads: int = 4  # attention heads (transformer); d_model must be a multiple
    n_kv_heads: int | None = None  # grouped-query attention (Llama checkpoints); None = n_heads
    ffn_hidden: int | None = None  # feed-forward hidden width; None = 4 * d_model (the research code's choice)
    mixer_kernel: int = 1  # token-mixing convolution kernel (masked mixer)
    mixer_heads: int = 1  # >1: multi-head mixer, each head its own masked convolution
    # attention kernel: torch's scaled_dot_product_attention, xformers' memory-efficient one, or the best available
    attention: typing.Literal['auto', 'sdpa', 'xformers'] = 'auto'
    rope_theta: float = 10000.0  # base of the rotary position embedding's frequencies
    norm_eps: float = 1e-6  # epsilon of the RMS norms
    context: int | None = None  # longest sequence the stack supports (a pretrained model's window); None = any
    scope: str = _SCOPE

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


@dataclass(frozen=True)
class Lora(_PlanPart):
    """LoRA adapters on a Backbone, through peft (compiler/backbone.py): B starts at zero, so step 0 is the base."""
    r: int = 8  # rank of each adapter's low-rank update
    alpha: float = 16.0  # scaling of the update: alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # module names (suffixes, e.g. ['q_proj', 'v_proj']) or ['all-linear'] (every linear layer but the output head)
    target_modules: tuple[str, ...] = ('all-linear',)
    modules_to_save: tuple[str, ...] = ()  # modules trained in full beside the adapters (e.g. ['lm_head'])
    scope: str = _SCOPE


@dataclass(frozen=True)
class Backbone(_PlanPart):
    """A pretrained Hugging Face model standing where a Stack stands, loaded by transformers' Auto classes without
    conversion (compiler/backbone.py). Its width, depth and vocabulary come from its config.json, read from a
    local folder or the local Hugging Face cache (the compiler never downloads)."""
    source: str = ''  # a hub id (e.g. 'meta-llama/Llama-3.2-1B') or a local folder save_pretrained wrote
    revision: str = 'main'  # hub revision (branch, tag or commit); a local folder has none
    dtype: typing.Literal['float32', 'bfloat16', 'float16'] = 'float32'  # the weights' dtype
    lora: Lora | None = None  # LoRA adapters on the backbone's linear layers (peft); None = none
    # the base weights train only when True; by default they stay frozen (a probe, or LoRA's frozen base)
    train_base: bool = False
    # decoder only: run the encoder's base model itself with its adapter disabled (the ICAE / 500xCompressor
    # layout); the source must be the encoder's
    share_encoder: bool = False
    trust_remote_code: bool = False  # refused: a spec never runs code shipped with a checkpoint
    scope: str = _SCOPE

    kind = 'backbone'

    def info(self):
        """The model's shape from its config.json (compiler.hub.info; cached, nothing downloaded)."""
        from compiler.hub import info
        return info(self.source, self.revision)

    @property
    def d_model(self) -> int:
        return self.info().d_model

    @property
    def n_layers(self) -> int:
        return self.info().n_layers

    @property
    def causal(self) -> bool:
        return self.info().causal

    @property
    def context(self) -> int | None:
        return self.info().context


@dataclass(frozen=True)
class Memory(_PlanPart):
    """How a chunk becomes one embedding and how the decoder reads it. Also the data shape: N chunks x L tokens."""
    chunks: int = 4  # N: chunks per sample, one memory each
    chunk_len: int = 32  # L: tokens per chunk
    position: typing.Literal['last', 'second_last'] = 'last'  # which real token's hidden state is the memory
    compression: int = 1  # >1: Linear(d, d/c) -> Linear(d/c, d) bottleneck
    noise: float = 0.0  # uniform noise amplitude added to memories in training (quantization-aware, paper 2**-4)
    # 'fixed': chunk c reads N slots, its c memories then pad (tokens always at position N); 'variable': N-1 slots,
    # unused ones masked out, so chunk c attends exactly its c memories and its tokens
    slots: typing.Literal['fixed', 'variable'] = 'fixed'
    pad: typing.Literal['ones', 'zeros', 'learned'] = 'learned'  # embedding of an empty memory slot
    decoder_input: typing.Literal['repeat', 'unroll'] = 'unroll'  # autoencoder decoder input
    # sequence_oracle: how its one memory enters the full-context decoder: 'token' (at position 0), 'concat' (on the
    # hidden dimension at every position: decoder d_model = token width + encoder d_model), 'add' (to every token
    # embedding)
    combine: typing.Literal['token', 'concat', 'add'] = 'token'
    scope: str = _SCOPE
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = ('combine',)


@dataclass(frozen=True)
class Objective(_PlanPart):
    # what is trained: an objective of the registry (compiler/objective_registry.py)
    kind: typing.Literal[OBJECTIVES] = 'clm'  # type: ignore[valid-type]
    weight: float = 1.0  # the objective's weight in the stage's loss (see Stage.normalize)
    delimiter: int = 0  # copy: number of delimiter tokens before the copy (research code: 3)
    temperature: float = 0.02  # retrieval InfoNCE temperature
    ngram: int = 7  # retrieval query length
    query: typing.Literal['ngram', 'nbag'] = 'ngram'  # contiguous n-gram or n random tokens
    scope: str = _SCOPE


@dataclass(frozen=True)
class Stage(_PlanPart):
    """One curriculum stage."""
    name: str = 'train'  # names the stage's weights (stages/<name>.safetensors) and memory group
    steps: int = 100  # optimizer steps (scaled by Run.steps_scale)
    objectives: tuple[Objective, ...] = (Objective(),)  # trained together, each on the same batch
    # 'weighted_sum': sum_i w_i * mean_i. 'faithful': the research code's clm_mean + 0.5 * copy_mean accident.
    normalize: typing.Literal['weighted_sum', 'faithful'] = 'weighted_sum'
    freeze: tuple[str, ...] = ()  # component names (see compiler.model.components), token embedding included
    init_from: dict[str, str] = field(default_factory=dict)  # component -> 'fresh' | 'previous' | 'run:<id>/<stage>'
    lr: float = 1e-3  # peak learning rate (AdamW)
    warmup: int = 0  # steps of linear warmup from 0 to lr (scaled by Run.steps_scale)
    decay: typing.Literal['cosine', 'linear', 'constant'] = 'cosine'  # schedule after warmup, to lr * min_lr_ratio
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of lr
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int | None = None  # rows of this stage's batches (examples of N x L tokens); None = Data.batch_size
    # objective kind -> weight in this stage, over the Objective's own weight: one objective (one gin scope) can
    # weigh differently in two stages. Applied when the Stage is built, so stage.objectives hold the weights used.
    weights: dict[str, float] = field(default_factory=dict)
    # rows per forward/backward; a step accumulates their gradients (row-weighted, as DDP ranks average).
    # Cache-sized blocks train faster on CPU and need less activation memory. None = the whole batch at once.
    micro_batch: int | None = None
    eval_every: int = 100  # held-out evaluation every this many steps (and at the stage's end)
    scope: str = _SCOPE
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = ('weights',)

    def __post_init__(self):
        super().__post_init__()
        kinds = [o.kind for o in self.objectives]
        for kind, w in self.weights.items():
            if w < 0:
                raise PlanError(self, 'weights', f"Stage.weights gives '{kind}' weight {w:g} in stage '{self.name}'",
                                'use a weight >= 0')
            if kind not in kinds:
                raise PlanError(self, 'weights', f"Stage.weights weighs '{kind}', which stage '{self.name}' does not "
                                f'train (its objectives: {", ".join(kinds)})',
                                f'weigh one of: {", ".join(kinds)}, or add a {kind} objective to the stage')
        if self.weights:
            object.__setattr__(self, 'objectives', tuple(
                dataclasses.replace(o, weight=float(self.weights[o.kind]), scope=o.scope) if o.kind in self.weights
                else o for o in self.objectives))


@dataclass(frozen=True)
class Data(_PlanPart):
    source: str = 'embedded'  # 'embedded' | path to .txt/.jsonl/.parquet | 'hub:<name>[:<config>]'
    split: str = 'train'  # hub split
    text_field: str = 'text'  # the field of .jsonl/.parquet/hub records that holds the text
    tokenizer: str | None = None  # path to tokenizer.json or pretrained dir; None = train BPE of vocab_size
    vocab_size: int = 2048  # BPE vocabulary trained on the corpus (with Data.tokenizer: must match it)
    # 'packed': documents joined by <eod> and cut into N x L windows; 'padded': one document per sample, padded
    layout: typing.Literal['packed', 'padded'] = 'packed'
    padding_side: typing.Literal['right', 'left'] = 'right'  # where 'padded' samples get their padding
    full_length_only: bool = False  # 'padded': keep only documents that fill all N x L tokens
    val_fraction: float = 0.05  # share of samples held out for evaluation and stored memories
    batch_size: int = 16  # samples per optimizer step (Stage.batch_size overrides it per stage)
    max_documents: int | None = None  # read at most this many documents of the source (None: all)
    cache_dir: str = '.cache/memspec'  # where tokenized data is cached, keyed by everything that shapes it
    scope: str = _SCOPE


@dataclass(frozen=True)
class Run(_PlanPart):
    name: str = 'run'  # the run's name in summary.md; the experiment's name when it has no spec file
    seed: int = 0  # seeds initialization, data order and sampling: a run is reproducible from its plan
    device: typing.Literal['auto', 'cpu', 'cuda'] = 'auto'  # auto: cuda where available, else cpu
    out_dir: str = 'runs'  # run folders, the default run database (sacred.db) and memory store go here
    # steps between resume points (checkpoint.pt) within a stage; every stage end writes one too. Scaled by
    # Run.steps_scale like the steps (at least 1), so a smoke test still checkpoints
    checkpoint_every: int = 200
    log_every: int = 10  # train/* metrics (loss, accuracy, lr, grad_norm, tokens/s) every this many steps
    eval_batches: int = 8  # held-out batches each evaluation reads
    # Zarr store for held-out memories at every stage end; '' = <out_dir>/memories.zarr, 'none' = off
    memory_store: str = ''
    # dtype of stored memories; float8: stored as their bits in uint8 (store/memories.py), needs torch's float8 dtypes
    memory_dtype: typing.Literal['float32', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2'] = 'float32'
    # torch.compile every Stack (first steps pay the compilation; weights and checkpoints unchanged)
    compile: bool = False
    # multiplies every stage's steps and warmup and Run.checkpoint_every (rounded, at least 1 step; eval_every capped
    # at the scaled steps) when the Plan is built, e.g. 0.01 for a smoke test of a whole curriculum (see scale_steps)
    steps_scale: float = 1.0
    # training numerics: 'fp32' (TF32 matmuls on CUDA), or autocast to 'bf16' / 'fp16' (fp16 with a gradient
    # scaler) over fp32 master weights and optimizer state (runtime/step.py)
    precision: typing.Literal['fp32', 'bf16', 'fp16'] = 'fp32'
    # several processes (torchrun, submitit): 'ddp' replicates the model, 'fsdp' shards parameters, gradients and
    # optimizer state (FSDP2, one shard unit per block); 'none' trains one process (runtime/distributed.py)
    parallel: typing.Literal['none', 'ddp', 'fsdp'] = 'none'
    # recompute every block's activations in backward instead of keeping them (less memory, ~1/3 more compute)
    activation_checkpointing: bool = False
    scope: str = _SCOPE
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = ('precision', 'parallel', 'activation_checkpointing')


@dataclass(frozen=True)
class Plan(_PlanPart):
    # the model family (compiler/families.py): what the encoder reads, whether memories form, what is decoded
    family: typing.Literal[FAMILIES] = 'clm'  # type: ignore[valid-type]
    decoder: Stack | Backbone = Stack()  # the stack that predicts tokens (reads memories in memory families)
    encoder: Stack | Backbone | None = None  # the stack that forms memories from chunks (memory families)
    # decoder of 'autoencode' stages in chunked memory models (curriculum stage 0); None = same as decoder
    ae_decoder: Stack | Backbone | None = None
    memory: Memory = Memory()  # memory formation and the N x L data shape
    data: Data = Data()  # corpus, tokenizer and batches
    curriculum: tuple[Stage, ...] = (Stage(),)  # stages trained in order, each from where the previous ended
    run: Run = Run()  # seed, device, outputs, logging and checkpoints
    scope: str = _SCOPE

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.curriculum)

    def stage_start(self, index: int) -> int:
        """Global step at which curriculum stage `index` starts (steps of the stages before it); index =
        len(curriculum) gives the total. The one place the curriculum's step offsets are computed."""
        return sum(s.steps for s in self.curriculum[:index])

    def batch_rows(self, stage: Stage) -> int:
        """Examples (rows of N x L tokens) per step of `stage`: Stage.batch_size, else Data.batch_size."""
        return stage.batch_size or self.data.batch_size

    def stage_end(self, name: str) -> int:
        """Global step at which the stage called `name` ends."""
        i = self.stage_names.index(name)
        return self.stage_start(i + 1)

    @property
    def hash(self) -> str:
        """The plan hash: what makes two runs the same experiment (the spec text, comments and the order of
        bindings do not count). Recorded with every run and memory group; --resume requires it to match."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        """Inverse of to_dict(), also for the copy recorded in a run's Sacred config (whose keys had '.' replaced
        by ':', which MongoDB forbids in keys)."""
        stack = lambda s: None if s is None else Stack(**s) if 'source' not in s else Backbone(  # noqa: E731
            **{**s, 'lora': s['lora'] and Lora(**s['lora'])})
        stages = tuple(Stage(**{**s, 'objectives': tuple(Objective(**o) for o in s['objectives']),
                                'init_from': {k.replace(':', '.'): v for k, v in s.get('init_from', {}).items()}})
                       for s in d['curriculum'])
        return cls(family=d['family'], decoder=stack(d['decoder']), encoder=stack(d.get('encoder')),
                   ae_decoder=stack(d.get('ae_decoder')), memory=Memory(**d['memory']), data=Data(**d['data']),
                   curriculum=stages, run=Run(**d['run']))


def scale_steps(plan: Plan) -> Plan:
    """The plan with Run.steps_scale applied to its curriculum: steps and warmup multiplied and rounded (steps at
    least 1), eval_every capped at the scaled steps. The built Plan holds the scaled numbers and the factor, so its
    hash, report and run record say what runs; applied once, by compiler.spec.load (a recorded plan is already
    scaled). Run.checkpoint_every is scaled too (rounded, at least 1), so a scaled run checkpoints as often relative
    to its steps. Factor 1 returns the plan unchanged (shipped specs keep their plan hashes)."""
    f = plan.run.steps_scale
    if f == 1:
        return plan
    stages = []
    for s in plan.curriculum:
        steps = max(1, round(s.steps * f))
        if steps >= INT_LIMIT:
            raise PlanError(plan.run, 'steps_scale', f'Run.steps_scale = {f:g} makes stage {s.name!r} '
                            f'{s.steps} x {f:g} steps, beyond the limit 2**63', 'use a smaller Run.steps_scale')
        stages.append(dataclasses.replace(s, steps=steps, warmup=round(s.warmup * f),
                                          eval_every=min(s.eval_every, steps)))
    every = min(INT_LIMIT - 1, max(1, round(plan.run.checkpoint_every * f)))
    run = dataclasses.replace(plan.run, checkpoint_every=every)
    return dataclasses.replace(plan, curriculum=tuple(stages), run=run)


CONFIGURABLES = {cls.__name__: cls for cls in (Stack, Lora, Backbone, Memory, Objective, Stage, Data, Run, Plan)}
for _name, _cls in CONFIGURABLES.items():
    gin.external_configurable(_cls, _name, denylist=['scope'])  # scope is recorded, never bound
