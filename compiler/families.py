"""The family registry: one record per model family, the only place that knows what a family is.

Every other module asks the record instead of testing family names: the validator (which objectives: those whose
stack the graph has, compiler/objective_registry.py; how many chunks, whether an encoder is needed), the cost model
(which components exist, what work one example costs), the graph builder (which class, how long each stack's
sequences are), the runtime (what to evaluate at a stage end, whether memories are stored), generation and offline
decoding. Adding a family is one record here plus its graph code in compiler/model.py; tests/test_families.py
enumerates the registry and checks that the cost model, the validator, the built graph and the evaluation suite agree
for every family.

The record describes the *work* of one example as passes over stacks (`Pass`): how many sequences of which length
each stack processes for an objective, how many of their positions the last block and the head compute. The cost
model prices passes; nothing else about a family's cost is written anywhere.

Nothing here imports torch, so a spec is checked without paying for it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from compiler.objective_registry import REGISTRY as OBJECTIVES
from compiler.objective_registry import ObjectiveKind

if TYPE_CHECKING:
    from compiler.plan import Plan


@dataclass(frozen=True)
class Pass:
    """`rows` sequences of `length` positions through one stack, per example. The last block computes only the
    last `keep` positions (None: all of them); the head scores `head` positions per sequence; `unroll`: the input
    is the memory unrolled over the positions (an autoencoding decoder, which never sees tokens)."""
    stack: str  # 'encoder', 'decoder' or 'ae_decoder'
    rows: int
    length: int
    keep: int | None = None
    head: int = 0
    unroll: bool = False


@dataclass(frozen=True)
class Work:
    """What one example costs for one objective: its passes and how many memories are formed (each through the
    memory's compression and projection)."""
    passes: tuple[Pass, ...]
    forms: int = 0


@dataclass(frozen=True)
class Family:
    name: str
    graph: str  # the class in compiler.model that builds it
    summary: str
    lengths: Callable[[Plan], dict[str, int]]  # stack role -> positions per sequence (mixers are built for it)
    work: Callable[[Plan, str], Work]  # (plan, objective kind) -> passes of one example
    encoder: str | None = None  # what its encoder reads: 'chunk' (each chunk alone), 'sequence' (all, future included)
    forms_memories: bool = False  # memory formation (compression, projection) exists
    pad_slot: bool = False  # the decoder has memory slots; an empty one holds the pad embedding
    chunk_slots: bool = False  # chunk c reads the memories of chunks < c in slots laid out by Memory.slots
    token_decoder: bool = True  # the decoder reads tokens (False: it regenerates its input from a memory)
    autoencode_via: str | None = None  # the stack that serves objectives that regenerate a chunk ('autoencode')
    min_chunks: int = 1
    ablation: bool = False  # stage ends also score with every memory replaced by the pad slot (ObjectiveKind.ablate)
    stores_memories: bool = False  # stage ends write held-out memories to the Zarr store
    generation: str | None = None  # KV-cached generation: 'causal' (one window) or 'memory' (chunks -> memories)
    cannot_generate: str = ''  # why not, when generation is None
    probe_source: str | None = None  # the component whose embedding an information probe can read
    combines: bool = False  # one memory enters a full-context decoder as Memory.combine says

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    def serves(self, kind: ObjectiveKind) -> bool:
        """Does the graph have the stack that serves an objective (ObjectiveKind.stack)?"""
        return {'decoder': self.token_decoder, 'regenerate': self.autoencode_via is not None,
                'encoder': self.has_encoder}[kind.stack]

    @property
    def objectives(self) -> frozenset[str]:
        """The objective kinds the graph serves."""
        return frozenset(k for k, o in OBJECTIVES.items() if self.serves(o))

    def eval_suite(self, plan: Plan) -> list[str]:
        """Objective kinds every stage end reports, whatever the stage trained: what this family can serve and the
        plan's chunks hold. A token decoder's family regenerates chunks only where the curriculum built the stack
        for it (needs_ae_decoder); a family that only regenerates reports nothing else."""
        built = {'decoder': self.token_decoder, 'regenerate': not self.token_decoder or needs_ae_decoder(plan),
                 'encoder': self.has_encoder}
        return [k for k, o in OBJECTIVES.items() if o.evaluated and built[o.stack] and self.serves(o) and o.fits(plan)]

    def readout(self, plan: Plan, stage: str | None = None) -> str | None:
        """How stored memories are decoded offline: 'decoder' (the autoencoder's own decoder), 'ae_decoder' (a
        memory model's stage-0 autoencoder decoder) or 'blank_copy' (the memory in the first slot, blank tokens).
        For the memories of a given stage of a memory model with an ae_decoder, the read-out that stage trains:
        'ae_decoder' where the stage autoencodes, else 'blank_copy' (the ae_decoder no longer changes after its
        stage, so decoding later stages through it would repeat that stage's numbers)."""
        if not self.stores_memories:
            return None
        if not self.token_decoder:
            return 'decoder'
        if not needs_ae_decoder(plan):
            return 'blank_copy'
        trains = [s for s in plan.curriculum if s.name == stage]
        if trains and not any(OBJECTIVES[o.kind].stack == 'regenerate' for o in trains[0].objectives):
            return 'blank_copy'
        return 'ae_decoder'


def _first(objective: str, n: int) -> int:
    """Chunks a pass skips: copy objectives supervise (and decode) only the second half."""
    return OBJECTIVES[objective].first_chunk(n)


def _read(plan: Plan) -> int:
    """Encoder positions a memory needs from the last block (the last real token, or the one before it)."""
    return 2 if plan.memory.position == 'second_last' else 1


def _unroll(plan: Plan) -> bool:
    return plan.memory.decoder_input == 'unroll'


# --- one decoder over the whole sequence (clm, full_context) ---------------------------------------------------

def _sequence_lengths(plan: Plan) -> dict[str, int]:
    return {'decoder': plan.memory.chunks * plan.memory.chunk_len}


def _sequence_work(plan: Plan, objective: str) -> Work:
    n, l = plan.memory.chunks, plan.memory.chunk_len
    first = _first(objective, n)
    return Work((Pass('decoder', 1, n * l, (n - first) * l if first else None, (n - first) * l),))


# --- every chunk -> one memory -> a decoder regenerates the chunk (autoencoder, probe) -------------------------

def _autoencoder_lengths(plan: Plan) -> dict[str, int]:
    return {'encoder': plan.memory.chunk_len, 'decoder': plan.memory.chunk_len}


def _autoencoding(plan: Plan, decoder: str) -> Work:
    n, l = plan.memory.chunks, plan.memory.chunk_len
    return Work((Pass(decoder, n, l, None, l, _unroll(plan)), Pass('encoder', n, l, _read(plan))), forms=n)


def _autoencoder_work(plan: Plan, objective: str) -> Work:
    return _autoencoding(plan, 'decoder')


# --- chunked memory models: memories of earlier chunks in slots before each chunk's tokens ---------------------

def _slots(plan: Plan) -> int:
    return plan.memory.chunks - 1 if plan.memory.slots == 'variable' else plan.memory.chunks


def _chunked_lengths(encoder: str | None) -> Callable[[Plan], dict[str, int]]:
    def lengths(plan: Plan) -> dict[str, int]:
        n, l = plan.memory.chunks, plan.memory.chunk_len
        out = {'decoder': _slots(plan) + l}
        if encoder == 'chunk':
            out['encoder'] = l
        elif encoder == 'sequence':
            out['encoder'] = n * l
        return out
    return lengths


def _chunked_work(encoder: str | None) -> Callable[[Plan, str], Work]:
    def work(plan: Plan, objective: str) -> Work:
        n, l = plan.memory.chunks, plan.memory.chunk_len
        if OBJECTIVES[objective].stack == 'regenerate':  # stage 0 autoencodes: every chunk through the ae_decoder
            return _autoencoding(plan, 'ae_decoder')
        first = _first(objective, n)
        decoder = Pass('decoder', n - first, _slots(plan) + l, l, l)  # the head reads token positions only
        if encoder == 'chunk':  # chunks 0..N-2, one memory each
            return Work((decoder, Pass('encoder', n - 1, l, _read(plan))), forms=n - 1)
        if encoder == 'sequence':  # the whole sequence once, every position read (chunk windows)
            return Work((decoder, Pass('encoder', 1, n * l)), forms=n - 1)
        return Work((decoder,))
    return work


# --- recurrent memory transformer: one memory carried chunk to chunk -----------------------------------------

def _recurrent_lengths(plan: Plan) -> dict[str, int]:
    return {'decoder': 1 + plan.memory.chunk_len}


def _recurrent_work(plan: Plan, objective: str) -> Work:
    n, l = plan.memory.chunks, plan.memory.chunk_len
    first = _first(objective, n)  # every chunk is run (the memory needs it); the head reads the scored ones only
    scored = Pass('decoder', n - first, 1 + l, None, l)
    return Work((Pass('decoder', first, 1 + l), scored) if first else (scored,), forms=n)


# --- the research code's oracle: one memory of the whole sequence in a full-context decoder ----------------------

def _combined_lengths(plan: Plan) -> dict[str, int]:
    t = plan.memory.chunks * plan.memory.chunk_len
    return {'encoder': t, 'decoder': t + (plan.memory.combine == 'token')}


def _combined_work(plan: Plan, objective: str) -> Work:
    n, l = plan.memory.chunks, plan.memory.chunk_len
    scored = (n - _first(objective, n)) * l  # the last block and the head compute token positions only
    return Work((Pass('decoder', 1, n * l + (plan.memory.combine == 'token'), scored, scored),
                 Pass('encoder', 1, n * l, _read(plan))), forms=1)


REGISTRY: dict[str, Family] = {f.name: f for f in (
    Family('clm', 'CausalLM', 'causal LM over all N x L tokens: the baseline and the source of causal encoders',
           _sequence_lengths, _sequence_work, generation='causal', probe_source='decoder'),
    Family('full_context', 'CausalLM', 'full-context transformer over N x L tokens, scored on the in-chunk targets',
           _sequence_lengths, _sequence_work, generation='causal', probe_source='decoder'),
    Family('autoencoder', 'Autoencoder', 'each chunk -> one memory -> a decoder regenerates every token of it',
           _autoencoder_lengths, _autoencoder_work, encoder='chunk', forms_memories=True,
           token_decoder=False, autoencode_via='decoder', stores_memories=True, probe_source='encoder',
           cannot_generate='an autoencoder regenerates its input from one memory; it does not continue text'),
    Family('probe', 'Autoencoder',
           'information probe: a (frozen) encoder and a fresh decoder that regenerates its input',
           _autoencoder_lengths, _autoencoder_work, encoder='chunk', forms_memories=True,
           token_decoder=False, autoencode_via='decoder', stores_memories=True, probe_source='encoder',
           cannot_generate='an information probe regenerates its input from one memory; it does not continue text'),
    Family('memory', 'ChunkedMemoryLM', 'chunked memory model: memories of earlier chunks before each chunk\'s tokens',
           _chunked_lengths('chunk'), _chunked_work('chunk'), encoder='chunk', forms_memories=True,
           pad_slot=True, chunk_slots=True, autoencode_via='ae_decoder', min_chunks=2, ablation=True,
           stores_memories=True,
           generation='memory', probe_source='encoder'),
    Family('no_memory', 'ChunkedMemoryLM', 'control: the memory model\'s decoder with every memory slot empty',
           _chunked_lengths(None), _chunked_work(None), pad_slot=True, chunk_slots=True, min_chunks=2,
           generation='memory'),
    Family('oracle', 'ChunkedMemoryLM', 'chunked oracle: the memory of chunk c is read from an encoder over the whole '
           'sequence, future included (the research code\'s oracle is sequence_oracle)',
           _chunked_lengths('sequence'), _chunked_work('sequence'), encoder='sequence',
           forms_memories=True, pad_slot=True, chunk_slots=True, autoencode_via='ae_decoder', min_chunks=2,
           ablation=True, probe_source='encoder',
           cannot_generate="the oracle's encoder reads the whole sequence, future included: there is no future to "
                           'read while generating'),
    Family('sequence_oracle', 'SequenceOracleLM',
           "the research code's oracle: one memory of the whole sequence, future included, in a full-context decoder "
           '(Memory.combine: as a token at position 0, concatenated on the hidden dimension, or added)',
           _combined_lengths, _combined_work, encoder='sequence', forms_memories=True, combines=True,
           probe_source='encoder',
           cannot_generate="the oracle's encoder reads the whole sequence, future included: there is no future to "
                           'read while generating'),
    Family('recurrent', 'RecurrentMemoryLM', 'recurrent memory transformer: one memory carried chunk to chunk',
           _recurrent_lengths, _recurrent_work, forms_memories=True, pad_slot=True, min_chunks=2,
           cannot_generate='the recurrent memory transformer carries its memory in the decoder output of the '
                           'previous chunk; KV-cached generation is not implemented for it'),
)}
NAMES = tuple(REGISTRY)


def family(plan_or_name) -> Family:
    """The record of a Plan's family (or of a family name)."""
    return REGISTRY[plan_or_name if isinstance(plan_or_name, str) else plan_or_name.family]


def needs_ae_decoder(plan: Plan) -> bool:
    """A memory model whose curriculum autoencodes (the frozen-encoder curriculum's stage 0) has an ae_decoder."""
    return family(plan).autoencode_via == 'ae_decoder' and any(
        OBJECTIVES[o.kind].stack == 'regenerate' for s in plan.curriculum for o in s.objectives)


def serving(kind: str) -> list[str]:
    """Names of the families whose graph serves an objective kind (for messages)."""
    return [f.name for f in REGISTRY.values() if kind in f.objectives]


# A block range of a stack: '<role>.layers.I-J' (blocks I to J) in Stage.freeze and Stage.init_from (compiler.model.
# parameters_of selects its parameters; '<role>.layers.I', one block, is a module path already)
BLOCK_RANGE = re.compile(r'^(encoder|decoder|ae_decoder)\.layers\.(\d+)-(\d+)$')


def block_range(name: str) -> tuple[str, int, int] | None:
    """'encoder.layers.0-7' -> ('encoder', 0, 7); None for any other name."""
    m = BLOCK_RANGE.match(name)
    return (m[1], int(m[2]), int(m[3])) if m else None


def in_component(name: str, component: str) -> bool:
    """Does the parameter or component `name` belong to `component`? Names are dotted module paths and a component
    owns everything under it: 'encoder' covers 'encoder.layers.0.mlp.up_proj.weight'. The one home of this rule
    (freezing, init_from, the cost model)."""
    return name == component or name.startswith(component + '.')
