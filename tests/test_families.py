"""The family registry (compiler/families.py) against everything that depends on it, for every registered family:
the validator accepts exactly the objectives the record lists, the cost model's components, parameter counts and
FLOPs equal the built graph's, the graph has the declared class and sequence lengths, the evaluation suite runs,
and generation and offline read-out are offered exactly where the record says so. A new family that is registered
without agreeing graph code fails here."""
import inspect
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compiler import cost
from compiler import objectives as O
from compiler import plan as P
from compiler.errors import SpecError, UserError
from compiler.families import NAMES, REGISTRY, family
from compiler.model import build, meta_build
from compiler.objective_registry import REGISTRY as OBJECTIVES
from compiler.spec import load
from runtime import decoding as D
from runtime import reading as R
from runtime import scoring as S
from runtime.train import evaluate, forward

KINDS = tuple(OBJECTIVES)
COPY_KINDS = tuple(k for k, o in OBJECTIVES.items() if o.copies)
SMALL = ['D_MODEL = 32', 'N_HEADS = 2', 'VOCAB = 300', 'CHUNKS = 4', 'CHUNK_LEN = 8', 'BATCH = 2']
IDS = O.SpecialIds(pad=0, blank=2, copy=3)


def compile_family(name: str, kind: str, *extra: str):
    """A one-stage plan of family `name` training objective `kind` (the tiny memory topology, any family)."""
    return load(['specs/memory_combined.gin'], SMALL + [f"Plan.family = '{name}'",
                                                     'combined/Stage.objectives = [@o/Objective()]',
                                                     f"o/Objective.kind = '{kind}'", *extra]).plan


def tokens(plan, rows=2):
    m = plan.memory
    return torch.randint(4, plan.data.vocab_size, (rows, m.chunks, m.chunk_len),
                         generator=torch.Generator().manual_seed(0))


def test_the_plan_accepts_exactly_the_registered_families():
    assert NAMES == tuple(REGISTRY) and len(NAMES) == len(set(NAMES))
    assert P.Plan.__dataclass_fields__['family'].type == 'typing.Literal[FAMILIES]'
    with pytest.raises(SpecError, match="Plan.family = 'nope' is not one of 'clm'"):
        load(['specs/memory_combined.gin'], ["Plan.family = 'nope'"])


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('kind', KINDS)
def test_validator_accepts_exactly_the_objectives_of_the_record(name, kind):
    fam = REGISTRY[name]
    if kind in fam.objectives:
        assert compile_family(name, kind).family == name
    else:
        with pytest.raises(SpecError, match=f"objective '{kind}'|retrieval compares encoder embeddings"):
            compile_family(name, kind)


@pytest.mark.parametrize('name', [n for n in NAMES if REGISTRY[n].min_chunks > 1])
def test_validator_enforces_the_minimum_chunk_count(name):
    kind = sorted(REGISTRY[name].objectives - set(COPY_KINDS))[0]
    with pytest.raises(SpecError, match=f"family '{name}' needs at least 2 chunks"):
        compile_family(name, kind, 'CHUNKS = 1')


def main_objective(name):
    return 'clm' if 'clm' in REGISTRY[name].objectives else 'autoencode'


@pytest.mark.parametrize('name', NAMES)
def test_graph_class_lengths_components_and_parameters_follow_the_record(name):
    fam = REGISTRY[name]
    extra = ['Stage.objectives = [@clm/Objective(), @ae/Objective()]'] if fam.autoencode_via == 'ae_decoder' else []
    plan = compile_family(name, main_objective(name))
    if extra:  # a curriculum with an autoencode stage: the graph grows an ae_decoder
        plan = load(['specs/memory_combined.gin'],
                    SMALL + [f"Plan.family = '{name}'",
                             "combined/Stage.objectives = [@clm/Objective(), @ae/Objective()]",
                             "ae/Objective.kind = 'autoencode'"]).plan
    model = build(plan)
    assert type(model).__name__ == fam.graph and model.family is family(plan)
    for role, length in fam.lengths(plan).items():
        assert getattr(model, role).seq_len == length
    assert [n for n in ('encoder', 'decoder') if hasattr(model, n) and getattr(model, n) is not None] == \
        (['encoder'] if fam.has_encoder else []) + ['decoder']
    assert hasattr(model, 'ae_decoder') == (fam.autoencode_via == 'ae_decoder' and bool(extra))
    predicted = cost.params(plan)
    built = {c: sum(p.numel() for n, p in model.named_parameters() if n == c or n.startswith(c + '.'))
             for c in predicted}
    assert built == predicted and sum(predicted.values()) == sum(p.numel() for p in model.parameters())
    assert cost.components(plan) == model.components() == meta_build(plan).components()
    assert ('memory.pad' in predicted) == fam.pad_slot
    assert ('decoder.embedding' in predicted) == fam.token_decoder


FORMING = ('Memory.compression = 2', 'encoder/Stack.d_model = 64')  # memory formation does matrix work too


@pytest.mark.parametrize('case', [(n, k, v) for n in NAMES for k in sorted(REGISTRY[n].objectives - {'retrieval'})
                                  for v in ((), FORMING)], ids=lambda c: f"{c[0]}-{c[1]}{'-forming' if c[2] else ''}")
def test_cost_model_flops_equal_the_graph_for_every_family_and_objective(case):
    """The record's passes, priced by the cost model, against torch's FLOP counter on the built graph (matrix
    products and token convolutions of one forward pass; attention scores are left out on both sides)."""
    name, kind, variant = case
    plan = compile_family(name, kind, *variant)
    model = build(plan)
    x = tokens(plan)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model, P.Objective(kind=kind), x, None, IDS)
    counted = sum(v for op, v in counter.get_flop_counts()['Global'].items()
                  if str(op).split('.')[1] in ('mm', 'addmm', 'convolution'))
    assert counted == pytest.approx(sum(cost.forward_flops(plan, kind, attention=False)) * len(x), rel=1e-9)


@pytest.mark.parametrize('name', NAMES)
def test_the_evaluation_suite_runs_and_reports_what_the_record_lists(name):
    plan = compile_family(name, main_objective(name))
    model = build(plan)
    x = tokens(plan, 4)
    out = evaluate(model, plan, x, torch.ones_like(x, dtype=torch.bool), IDS, 2, 1, None, plan.data.vocab_size)
    kinds = family(plan).eval_suite(plan)
    forms = [(k, OBJECTIVES[k]) for k in kinds] + [(OBJECTIVES[k].needle, OBJECTIVES[k]) for k in kinds
                                                     if OBJECTIVES[k].needle]
    expected = {f'{name}.token_accuracy' for name, _ in forms}
    if family(plan).ablation:
        expected |= {f'{name}_ablated.token_accuracy' for name, rec in forms if rec.ablated_twin()}
    assert {k for k in out if k.endswith('.token_accuracy')} == expected
    # what the graph can serve: every evaluated objective kind of its record is evaluated when it applies
    assert set(kinds) == {k for k in family(plan).objectives if OBJECTIVES[k].evaluated and (
                          k != 'autoencode' or not family(plan).token_decoder)}
    # the in-run no-memory control exists exactly where the graph has memories to take away
    assert family(plan).ablation == (getattr(model, 'use_memory', False) and
                                      'ablate_memory' in inspect.signature(model.forward).parameters)


@pytest.mark.parametrize('name', NAMES)
def test_generation_and_readout_are_offered_where_the_record_says(name):
    """Every family whose decoder reads tokens scores text; every one of them but the oracle (whose encoder reads
    the future) generates, through a KV cache where the record has a cached generation, else through the trained
    forward pass; the others are refused with their record's reason, once, for scoring and generating alike."""
    fam = REGISTRY[name]
    plan = compile_family(name, main_objective(name))
    if not fam.token_decoder or fam.encoder == 'sequence':
        with pytest.raises(UserError, match=f"family '{name}' cannot generate: {re.escape(fam.cannot_generate)}"):
            R.check_decodes(plan, 'run x', sampling=True)
    if not fam.token_decoder:
        with pytest.raises(UserError, match=f"family '{name}' cannot generate"):
            R.check_decodes(plan, 'run x')
    else:
        R.check_decodes(plan, 'run x')
        model = build(plan).eval()
        assert R.reading(model).forward == (fam.generation is None)
        row = torch.randint(4, 300, (20,)).tolist()
        assert len(S.score(model, [row[:12]], [row[12:]])[0].logprobs) == 8
        out = D.generate(model, [row], max_new_tokens=12)
        assert len(out.tokens[0]) == 12
    assert (fam.readout(plan) is not None) == fam.stores_memories
    if fam.stores_memories:
        memories = build(plan).encode(torch.randint(4, 300, (3, plan.memory.chunk_len)))
        assert memories.shape == (3, plan.decoder.d_model)
