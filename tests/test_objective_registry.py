"""The objective registry (compiler/objective_registry.py) against everything that depends on it, for every registered
objective kind: the Plan accepts exactly the registered kinds, the validator accepts and refuses exactly as the record
says (which families serve it, what it needs from the plan), the example builder's targets lie where the record's
target positions and first chunk say, the loss is finite and reaches the parameters of a tiny model, the trainer logs
the record's metric, and the stage-end evaluation reports the record's metrics. A kind registered without agreeing
code fails here; a kind registered here at run time trains and evaluates without touching any other module."""
import types

import pytest
import torch

from compiler import objectives as O
from compiler import plan as P
from compiler.errors import UserError, either
from compiler.families import NAMES as FAMILIES
from compiler.families import REGISTRY as FAMILY
from compiler.families import family, serving
from compiler.model import build
from compiler.objective_registry import NAMES, REGISTRY, ObjectiveKind, faithful_pair, objective
from compiler.spec import load
from runtime import train as T
from runtime.trainer import Trainer

SMALL = ['D_MODEL = 32', 'N_HEADS = 2', 'VOCAB = 300', 'CHUNKS = 4', 'CHUNK_LEN = 8', 'BATCH = 4']
IDS = O.SpecialIds(pad=0, blank=2, copy=3)
COPIES = [k for k in NAMES if REGISTRY[k].copies]


def compile_kind(fam: str, kind: str, *extra: str) -> P.Plan:
    """A one-stage plan of family `fam` training objective `kind` (the tiny memory topology, any family)."""
    return load(['specs/memory_combined.gin'], SMALL + [f"Plan.family = '{fam}'",
                                                     'combined/Stage.objectives = [@o/Objective()]',
                                                     f"o/Objective.kind = '{kind}'", *extra]).plan


def a_family(kind: str) -> str:
    """The first registered family that serves `kind`."""
    return next(f for f in FAMILIES if FAMILY[f].serves(REGISTRY[kind]))


def tokens(plan: P.Plan, rows: int = 4, seed: int = 0) -> torch.Tensor:
    m = plan.memory
    return torch.randint(4, plan.data.vocab_size, (rows, m.chunks, m.chunk_len),
                         generator=torch.Generator().manual_seed(seed))


def test_the_plan_accepts_exactly_the_registered_kinds():
    assert NAMES == tuple(REGISTRY) and all(REGISTRY[k].name == k for k in NAMES)
    assert P.Objective.__dataclass_fields__['kind'].type.startswith('typing.Literal[OBJECTIVES]')
    for kind in NAMES:
        assert P.Objective(kind=kind).kind == kind
    with pytest.raises(UserError, match="Objective.kind = 'blank_cpy' is not one of " +
                       ', '.join(repr(k) for k in NAMES)):
        load(['specs/memory_combined.gin'], ["blank/Objective.kind = 'blank_cpy'"])


# Which family serves which objective: the contract every shipped spec and recorded run relies on
SERVED = {'clm': {'clm', 'copy', 'blank_copy', 'random_copy'},
          'full_context': {'clm', 'copy', 'blank_copy', 'random_copy'},
          'autoencoder': {'autoencode', 'retrieval'}, 'probe': {'autoencode', 'retrieval'},
          'memory': {'clm', 'copy', 'blank_copy', 'random_copy', 'autoencode', 'retrieval'},
          'no_memory': {'clm', 'copy', 'blank_copy', 'random_copy'},
          'oracle': {'clm', 'copy', 'blank_copy', 'random_copy', 'autoencode', 'retrieval'},
          'recurrent': {'clm', 'copy', 'blank_copy', 'random_copy'},
          'sequence_oracle': {'clm', 'copy', 'blank_copy', 'random_copy', 'retrieval'}}


def test_the_families_serve_what_they_served_before_the_registry():
    assert {f: set(FAMILY[f].objectives) for f in FAMILIES} == SERVED


@pytest.mark.parametrize('fam', FAMILIES)
@pytest.mark.parametrize('kind', NAMES)
def test_validator_accepts_or_refuses_with_the_records_message(fam, kind):
    rec = REGISTRY[kind]
    if FAMILY[fam].serves(rec):
        assert compile_kind(fam, kind).curriculum[0].objectives[0].kind == kind
        return
    with pytest.raises(UserError) as e:
        compile_kind(fam, kind)
    what, fix = rec.refusal
    expected = what.format(tag="stage 'combined'", kind=kind, family=fam, serving=either(serving(kind)))
    assert f'{expected}\n  fix: {fix}' in str(e.value)


@pytest.mark.parametrize('kind', NAMES)
def test_the_chunk_count_is_refused_exactly_where_the_record_copies(kind):
    """An odd chunk count: a copy objective cannot split it into halves; every other objective trains on it."""
    fam = a_family(kind)
    if not REGISTRY[kind].copies:
        assert compile_kind(fam, kind, 'CHUNKS = 3').memory.chunks == 3
        return
    with pytest.raises(UserError, match=f"objective '{kind}' copies the first half of the chunks into the second and "
                       'needs an even number >= 2 of chunks, got 3'):
        compile_kind(fam, kind, 'CHUNKS = 3')
    with pytest.raises(UserError, match='8 delimiter tokens do not fit a chunk of 8'):
        compile_kind(fam, kind, 'o/Objective.delimiter = 8')


@pytest.mark.parametrize('kind', NAMES)
def test_micro_batches_are_refused_exactly_for_batch_negatives(kind):
    fam = a_family(kind)
    if not REGISTRY[kind].batch_negatives:
        assert compile_kind(fam, kind, 'combined/Stage.micro_batch = 2').curriculum[0].micro_batch == 2
        return
    with pytest.raises(UserError, match=f"has a {kind} objective, whose negatives are the other rows of the batch"):
        compile_kind(fam, kind, 'combined/Stage.micro_batch = 2')


def test_the_records_own_checks_refuse():
    with pytest.raises(UserError, match=r'retrieval ngram 9 must be in \[1, chunk_len=8\]'):
        compile_kind('memory', 'retrieval', 'o/Objective.ngram = 9')


@pytest.mark.parametrize('pair', [(a, b) for a in NAMES for b in NAMES if a < b])
def test_faithful_normalisation_needs_clm_and_one_copy_objective(pair):
    ok = faithful_pair(pair)
    assert ok == (set(pair) & {'clm'} != set() and any(REGISTRY[k].copies for k in pair))
    stage = ['combined/Stage.objectives = [@a/Objective(), @b/Objective()]', f"a/Objective.kind = '{pair[0]}'",
             f"b/Objective.kind = '{pair[1]}'", "combined/Stage.normalize = 'faithful'"]
    fam = next((f for f in FAMILIES if all(k in FAMILY[f].objectives for k in pair)), None)
    if fam is None:
        return
    if ok:
        plan = load(['specs/memory_combined.gin'], SMALL + [f"Plan.family = '{fam}'", *stage]).plan
        losses = {pair[0]: torch.tensor(2.0), pair[1]: torch.tensor(3.0)}
        copy = 3.0 if REGISTRY[pair[1]].copies else 2.0
        assert O.combine(losses, plan.curriculum[0]).item() == pytest.approx(5.0 - copy + 0.5 * copy)
    else:
        with pytest.raises(UserError, match="'faithful' reproduces clm_mean"):
            load(['specs/memory_combined.gin'], SMALL + [f"Plan.family = '{fam}'", *stage])


PADDED_MASK = torch.ones(2, 4, 8, dtype=torch.bool)
PADDED_MASK[1, 3, 5:] = False  # the last chunk of the second row is padded


@pytest.mark.parametrize('kind', NAMES)
def test_targets_lie_where_the_record_says(kind):
    """Labels exist only at the record's target positions and in the chunks from its first chunk on; there they are
    the targets the record names: the token itself ('self') or the next token of the same chunk ('next') of the
    original sequence (a copy objective's second half predicts the first half's tokens as its input shows them)."""
    rec = REGISTRY[kind]
    x = torch.randint(4, 300, (2, 4, 8), generator=torch.Generator().manual_seed(1))
    for mask in (None, PADDED_MASK):
        inputs, m, labels = O.make_example(P.Objective(kind=kind), x, mask, IDS)
        assert inputs.shape == labels.shape == x.shape and (m is None) == (mask is None)
        first = rec.first_chunk(4)
        assert (labels[:, :first] == O.IGNORE).all()
        outside = torch.ones(8, dtype=torch.bool)
        outside[rec.target_positions()] = False
        assert (labels[..., outside] == O.IGNORE).all()
        # and every target position has a target somewhere: the head runs on no position in vain
        assert (labels[..., rec.target_positions()] != O.IGNORE).flatten(0, 1).any(0).all()
        # the chunks whose tokens the supervised chunks predict: a copy's first half as its input shows it
        source = (inputs if rec.copies else x)[:, :4 - first]
        source_mask = None if mask is None else (m if rec.copies else mask)[:, :4 - first]
        expected = (source if source_mask is None else torch.where(source_mask, source, O.IGNORE)) \
            if rec.targets == 'self' else O.shifted_labels(source, source_mask)
        assert torch.equal(labels[:, first:], expected)
        assert (labels[:, first:] != O.IGNORE).any()


@pytest.mark.parametrize('kind', NAMES)
def test_the_loss_is_finite_and_reaches_the_parameters(kind):
    """The record's loss (its own, or the head's cross-entropy) on a tiny model of every family serving it: a finite
    mean, a metric in [0, 1], a gradient on the stack that serves it, the same value through stage_loss."""
    for fam in [f for f in FAMILIES if FAMILY[f].serves(REGISTRY[kind])]:
        plan = compile_kind(fam, kind)
        model = build(plan)
        obj = plan.curriculum[0].objectives[0]
        x = tokens(plan)
        loss, metric = T.loss_function(obj)(model, obj, x, None, IDS, torch.Generator().manual_seed(0))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0 and 0 <= float(metric) <= 1
        loss.backward()
        stack = {'decoder': 'decoder', 'regenerate': family(plan).autoencode_via, 'encoder': 'encoder'}[
            REGISTRY[kind].stack]
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(stack + '.')]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), (fam, stack)
        total, losses, metrics = T.stage_loss(model, plan.curriculum[0], x, None, IDS,
                                              torch.Generator().manual_seed(0))
        assert list(losses) == list(metrics) == [kind]
        torch.testing.assert_close(losses[kind], loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize('kind', NAMES)
def test_the_trainer_logs_the_records_metric(kind):
    logged = {}
    trainer = types.SimpleNamespace(global_mean=lambda d: {k: float(v) for k, v in d.items()},
                                    tracker=types.SimpleNamespace(scalar=lambda k, v, step: logged.update({k: v})))
    bar = types.SimpleNamespace(set_postfix=lambda **kw: None)
    one = torch.tensor(0.5)
    Trainer.log_step(trainer, one, {kind: one}, {kind: one}, one, 1e-3, 10.0, 7, bar)
    assert {k for k in logged if k.startswith(f'train/{kind}.')} == {f'train/{kind}.loss',
                                                                      f'train/{kind}.{REGISTRY[kind].metric}'}


@pytest.mark.parametrize('fam', FAMILIES)
def test_the_stage_end_evaluation_reports_the_records_metrics(fam):
    """Every evaluated kind the family serves and the plan fits is scored, with bits per byte where the record's
    targets are the whole text, ce per chunk and a needle form where the record asks, and an ablated twin where the
    record asks (copies always) and the family can ablate; nothing else."""
    kinds = sorted(FAMILY[fam].objectives)
    plan = compile_kind(fam, 'clm' if 'clm' in kinds else 'autoencode')
    x = tokens(plan)
    out = T.evaluate(build(plan), plan, x, torch.ones_like(x, dtype=torch.bool), IDS, 2, 1, 4.0,
                     plan.data.vocab_size)
    expected = set()
    for kind in family(plan).eval_suite(plan):
        rec = REGISTRY[kind]
        names = {'ce', 'token_accuracy', 'normalized_hamming', 'info_proportion'} | (
            {'bits_per_byte'} if rec.bits_per_byte else set())
        chunks = {f'ce.chunk{c}' for c in range(plan.memory.chunks)} if rec.per_chunk else set()
        forms = [(kind, names | chunks)] + ([(rec.needle, names - {'bits_per_byte'})] if rec.needle else [])
        for name, metrics in forms:
            expected |= {f'{name}.{n}' for n in metrics}
            if rec.ablated_twin() and FAMILY[fam].ablation:
                expected |= {f'{name}_ablated.{n}' for n in metrics}
    assert set(out) == expected
    scored = {k.split('.')[0].removesuffix('_ablated') for k in out}
    assert not any(k.startswith(tuple(n + '.' for n in NAMES if not REGISTRY[n].evaluated)) for k in out)
    needles = {REGISTRY[k].needle for k in NAMES if REGISTRY[k].needle}
    assert all(k in FAMILY[fam].objectives or k in needles for k in scored)


REVERSE = ObjectiveKind('reverse_copy', 'the first half of the chunks, each reversed: predict the reversal',
                        'decoder', 'reverse_copy_example', copies=True, refusal=REGISTRY['copy'].refusal)


def reverse_copy_example(obj, x, key_mask, ids):
    inputs, mask, labels = O.copy_example(obj, x, key_mask, ids)
    h = x.shape[1] // 2
    flipped = x[:, :h].flip(-1)
    inputs = torch.cat([x[:, :h], flipped], 1)
    labels = labels.clone()
    labels[:, h:] = O.shifted_labels(flipped, None if key_mask is None else key_mask[:, :h].flip(-1))
    return inputs, mask, labels


def test_a_kind_registered_in_one_place_trains_and_evaluates(monkeypatch):
    """What adding an objective takes: one record and its example function. The Plan, the validator, the cost model,
    the loss, the trainer's metric name and the stage-end evaluation follow from them."""
    monkeypatch.setitem(REGISTRY, 'reverse_copy', REVERSE)
    monkeypatch.setattr(P, 'OBJECTIVES', NAMES + ('reverse_copy',))
    monkeypatch.setitem(O.EXAMPLES, 'reverse_copy_example', reverse_copy_example)
    plan = compile_kind('memory', 'reverse_copy')
    assert objective(plan.curriculum[0].objectives[0]) is REVERSE
    with pytest.raises(UserError, match="objective 'reverse_copy' copies the first half"):
        compile_kind('memory', 'reverse_copy', 'CHUNKS = 3')
    model = build(plan)
    x = tokens(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss, losses, _ = T.stage_loss(model, plan.curriculum[0], x, None, IDS)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first  # it learns the one batch
    out = T.evaluate(model, plan, x, torch.ones_like(x, dtype=torch.bool), IDS, 2, 1, None, plan.data.vocab_size)
    assert {'reverse_copy.token_accuracy', 'reverse_copy_ablated.token_accuracy'} <= set(out)


def test_random_copy_scrambles_the_first_half_across_the_batch_and_copies_it_visible():
    """The visible-text flagship's objective: the first half holds the batch's own first-half tokens in a fixed
    scrambled order (padding moves with its slot), the second half repeats it visible, as copy does."""
    x = torch.randint(4, 300, (2, 4, 8), generator=torch.Generator().manual_seed(1))
    inputs, m, labels = O.make_example(P.Objective(kind='random_copy'), x, PADDED_MASK, IDS)
    first = inputs[:, :2]
    assert sorted(first.flatten().tolist()) == sorted(x[:, :2].flatten().tolist()) and not torch.equal(first, x[:, :2])
    assert torch.equal(inputs[:, 2:], first) and torch.equal(inputs[:, 2:], inputs[:, :2])
    assert int(m[:, :2].sum()) == int(PADDED_MASK[:, :2].sum())  # as many padded slots, moved with their tokens
    assert torch.equal(labels[:, 2:], O.shifted_labels(first, m[:, :2]))
    again = O.make_example(P.Objective(kind='random_copy'), x, PADDED_MASK, IDS)
    assert all(torch.equal(a, b) for a, b in zip((inputs, m, labels), again))  # deterministic: resume-safe
