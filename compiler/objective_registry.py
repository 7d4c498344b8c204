"""The objective registry: one record per objective kind, the only place that knows what an objective is.

Every other module asks the record instead of testing kind names: the Plan (which kinds `Objective.kind` accepts),
the validator (which families serve a kind, what it needs from the plan), the family registry (what one example
costs, what a stage end evaluates), the example builder and the head (compiler/objectives.py: which function builds
the example, which positions can have a target), the runtime (which stack serves it, which loss, which metric it
logs, how it is scored at a stage end). Adding an objective is one record here plus its example or loss function in
compiler/objectives.py; tests/test_objective_registry.py enumerates the registry and checks that the validator, the
examples, the losses and the stage-end evaluation agree with every record.

Nothing here imports torch, so a spec is checked without paying for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:
    from compiler.plan import Objective, Plan


class Problem(NamedTuple):
    """A refusal of the validator: (owner, field) names the binding, then what is wrong and how to fix it."""
    owner: object
    field: str
    what: str
    fix: str


@dataclass(frozen=True)
class ObjectiveKind:
    name: str
    summary: str
    # which stack serves it: 'decoder' (the graph's forward over the chunks, scored by the token decoder's head; the
    # family needs a token decoder), 'regenerate' (the family's autoencode_via stack regenerates each chunk from its
    # memory) or 'encoder' (only encoder embeddings: the family needs an encoder)
    stack: str
    # the example builder, a function registered with @example in compiler.objectives: (objective, tokens, key mask,
    # ids) -> (inputs, input key mask, labels)
    example: str
    # the targets: 'next' (the next token inside the chunk: every position but the last can have one) or 'self'
    # (every token predicts itself)
    targets: str = 'next'
    # the function in compiler.objectives that computes the loss, (model, objective, tokens, mask, ids, generator) ->
    # (loss, metric); None: the head's cross-entropy on the example's labels (runtime.train.objective_loss, the
    # region Run.compile compiles)
    loss: str | None = None
    metric: str = 'token_accuracy'  # the second value of the loss, logged as train/<kind>.<metric>
    # the input repeats the first half of the chunks: only the second half is decoded and supervised, the chunk count
    # must be even, stage ends score it on full-length sequences only, and again with memories ablated where the
    # family can ablate (Family.ablation)
    copies: bool = False
    evaluated: bool = True  # stage ends report its held-out metrics (where its family serves it and the plan fits)
    bits_per_byte: bool = False  # its targets are all of the text: bits per byte are reported
    batch_negatives: bool = False  # contrasts each row with the other rows of the batch: no micro-batches
    # stage ends also score it with every memory replaced by the pad slot ('<kind>_ablated', where the family can
    # ablate: Family.ablation); copy objectives always are. The within-model measure of memory use
    ablate: bool = False
    # stage ends report its ce per chunk index ('<kind>.ce.chunk<c>', and of its ablated twin): chunk 0 never has a
    # memory, so its ablated loss must not change (nothing leaks); later chunks show what memories add
    per_chunk: bool = False
    # a copy objective's needle form, reported at stage ends under this name: chunk 0 replaced by held-out tokens
    # drawn at random (a key no language model can predict), scored on the first copied chunk only (the key asked
    # one copy distance later), with its ablated twin where the family can ablate
    needle: str | None = None
    # further checks of the objective in a plan: (objective, plan, tag) -> the first Problem, or None
    check: Callable[[Objective, Plan, str], Problem | None] | None = None
    # the validator's message where a family does not serve it (str.format: tag, kind, family, serving = the families
    # that do) and its fix
    refusal: tuple[str, str] = ('', '')

    def ablated_twin(self) -> bool:
        """Do stage ends score it again with memories ablated (where the family can ablate)?"""
        return self.copies or self.ablate

    def first_chunk(self, chunks: int) -> int:
        """The first chunk a pass decodes and supervises (copy objectives: the second half)."""
        return chunks // 2 if self.copies else 0

    def target_positions(self) -> slice:
        """The positions of a chunk that can have a target, so that the head need not run elsewhere."""
        return slice(None) if self.targets == 'self' else slice(None, -1)

    def fits(self, plan: Plan) -> bool:
        """Can this plan's chunks hold the objective (a copy needs an even number >= 2 of chunks)?"""
        n = plan.memory.chunks
        return not self.copies or (n >= 2 and n % 2 == 0)

    def problem(self, obj: Objective, plan: Plan, tag: str) -> Problem | None:
        """What the objective needs from the plan beyond a family that serves it (the validator asks)."""
        m = plan.memory
        if not self.fits(plan):
            return Problem(m, 'chunks', f"{tag}: objective '{self.name}' copies the first half of the chunks into the "
                           f'second and needs an even number >= 2 of chunks, got {m.chunks}',
                           'set Memory.chunks to 2, 4, 8, ...')
        if self.copies and obj.delimiter >= m.chunk_len:
            return Problem(obj, 'delimiter', f'{tag}: {obj.delimiter} delimiter tokens do not fit a chunk of '
                           f'{m.chunk_len}', 'use 0 or 3')
        return self.check(obj, plan, tag) if self.check else None


def _check_ngram(obj: Objective, plan: Plan, tag: str) -> Problem | None:
    n = plan.memory.chunk_len
    if obj.ngram > n:
        return Problem(obj, 'ngram', f'{tag}: retrieval ngram {obj.ngram} must be in [1, chunk_len={n}]', 'use e.g. 7')
    return None


CAUSAL_REFUSAL = ("{tag}: objective '{kind}' needs a causal decoder; the '{family}' family regenerates its input",
                  "use objective kind 'autoencode'")

# The order is the order of the stage-end evaluation and of the Literal of Objective.kind
REGISTRY: dict[str, ObjectiveKind] = {o.name: o for o in (
    ObjectiveKind('clm', 'next token inside each chunk (a chunk sees the memories of earlier chunks and its own '
                  'tokens)', 'decoder', 'next_token_example', bits_per_byte=True, ablate=True, per_chunk=True,
                  refusal=CAUSAL_REFUSAL),
    ObjectiveKind('copy', 'the first half of the chunks repeated: predict the second half, tokens visible',
                  'decoder', 'copy_example', copies=True, needle='needle', refusal=CAUSAL_REFUSAL),
    ObjectiveKind('blank_copy', 'the first half of the chunks, then blank tokens: recall the second half from '
                  'memories alone', 'decoder', 'blank_copy_example', copies=True, needle='needle_blank',
                  refusal=CAUSAL_REFUSAL),
    ObjectiveKind('random_copy', 'copy of a first half whose tokens are scrambled across the batch: the next token '
                  'visible in the input yet predictable only from memories', 'decoder', 'random_copy_example',
                  copies=True, evaluated=False, refusal=CAUSAL_REFUSAL),  # held out: the needle, visible form
    ObjectiveKind('autoencode', 'every chunk -> one memory -> a decoder regenerates every token of it',
                  'regenerate', 'autoencode_example', targets='self',
                  refusal=("{tag}: objective '{kind}' needs an encoder ({serving} family), the plan is '{family}'",
                           "use Plan.family = 'autoencoder', or a clm/copy objective")),
    ObjectiveKind('retrieval', "InfoNCE between the encoder embeddings of an n-gram query and of each document's "
                  'first chunk, the other rows of the batch the negatives', 'encoder', 'next_token_example',
                  loss='retrieval_loss', metric='top1_accuracy', evaluated=False, batch_negatives=True,
                  check=_check_ngram,
                  refusal=("{tag}: retrieval compares encoder embeddings; family '{family}' has no encoder",
                           'use a family with an encoder')),
)}
NAMES = tuple(REGISTRY)


def objective(obj_or_kind) -> ObjectiveKind:
    """The record of an Objective's kind (or of a kind name)."""
    return REGISTRY[obj_or_kind if isinstance(obj_or_kind, str) else obj_or_kind.kind]


def faithful_pair(kinds) -> bool:
    """Stage.normalize = 'faithful' reproduces the research code's clm_mean + 0.5 * copy_mean: it needs exactly the
    clm objective and one copy objective."""
    kinds = set(kinds)
    return len(kinds) == 2 and 'clm' in kinds and all(k == 'clm' or REGISTRY[k].copies for k in kinds)


def faithful_parts(kinds) -> tuple[str, str]:
    """(the clm kind, the copy kind) of a faithful stage's objective kinds."""
    return 'clm', next(k for k in kinds if REGISTRY[k].copies)
