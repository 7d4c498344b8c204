"""The within-model measures of memory use that every stage end reports (runtime.train.evaluate, from the records of
compiler/objective_registry.py): clm with memories ablated, clm loss per chunk index, and the needle in its visible
and blank forms, checked against forwards computed here by hand on a tiny memory model."""
import torch
import torch.nn.functional as F

from compiler import objectives as O
from compiler import plan as P
from compiler.model import build
from compiler.spec import load
from runtime import train as T

SMALL = ['D_MODEL = 32', 'N_HEADS = 2', 'VOCAB = 300', 'CHUNKS = 4', 'CHUNK_LEN = 8', 'BATCH = 4']
IDS = O.SpecialIds(pad=0, blank=2, copy=3)


def setup(rows=6):
    plan = load(['specs/memory_combined.gin'], SMALL).plan
    torch.manual_seed(0)
    model = build(plan).eval()
    m = plan.memory
    x = torch.randint(4, plan.data.vocab_size, (rows, m.chunks, m.chunk_len),
                      generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x, dtype=torch.bool)
    return plan, model, x, mask


def evaluate(plan, model, x, mask):
    return T.evaluate(model, plan, x, mask, IDS, 3, 10, None, plan.data.vocab_size)


def by_hand(model, kind, x, mask, ablate, chunk=None):
    """(mean ce, token accuracy) of one objective over all rows in one forward, optionally of one output chunk."""
    with torch.no_grad():
        logits, labels = T.forward(model, P.Objective(kind=kind), x, T.padding(mask), IDS, ablate)
    if chunk is not None:
        logits, labels = logits[:, chunk], labels[:, chunk]
    valid = labels != O.IGNORE
    ce = F.cross_entropy(logits[valid].float(), labels[valid])
    return float(ce), float((logits.argmax(-1) == labels)[valid].float().mean())


def test_per_chunk_losses_average_to_the_clm_loss_weighted_by_targets():
    plan, model, x, mask = setup()
    mask[0, 3, 5:] = False  # padding: chunk 3 has fewer targets than the others
    mask[1, 2, 2:] = False
    x = torch.where(mask, x, IDS.pad)
    out = evaluate(plan, model, x, mask)
    _, _, labels = O.make_example(P.Objective(kind='clm'), x, mask, IDS)
    targets = (labels != O.IGNORE).sum((0, 2)).tolist()
    assert targets[1] > targets[3]  # the weights differ, so an unweighted mean would not do
    for suffix in ('', '_ablated'):
        per = [out[f'clm{suffix}.ce.chunk{c}'] for c in range(plan.memory.chunks)]
        weighted = sum(p * n for p, n in zip(per, targets)) / sum(targets)
        assert abs(weighted - out[f'clm{suffix}.ce']) < 1e-5
        assert abs(out[f'clm{suffix}.ce.chunk2'] - by_hand(model, 'clm', x, mask, suffix == '_ablated', 2)[0]) < 1e-5


def test_ablated_clm_is_the_forward_with_every_memory_the_pad_slot_and_chunk_0_does_not_change():
    plan, model, x, mask = setup()
    out = evaluate(plan, model, x, mask)
    ce, acc = by_hand(model, 'clm', x, mask, True)
    assert abs(out['clm_ablated.ce'] - ce) < 1e-5 and abs(out['clm_ablated.token_accuracy'] - acc) < 1e-9
    assert abs(out['clm.ce'] - by_hand(model, 'clm', x, mask, False)[0]) < 1e-5
    assert abs(out['clm.ce.chunk0'] - out['clm_ablated.ce.chunk0']) < 1e-5  # chunk 0 never has a memory: no leak
    later = [abs(out[f'clm.ce.chunk{c}'] - out[f'clm_ablated.ce.chunk{c}']) for c in range(1, plan.memory.chunks)]
    assert max(later) > 1e-4  # ...while later chunks read them, so the equality above is not vacuous


def test_needle_rows_replace_chunk_0_with_held_out_tokens_drawn_at_random():
    _, _, x, _ = setup()
    n = T.needle_rows(x)
    assert torch.equal(n[:, 1:], x[:, 1:]) and not torch.equal(n[:, 0], x[:, 0])
    assert set(n[:, 0].flatten().tolist()) <= set(x.flatten().tolist())  # the text's own tokens
    assert torch.equal(n, T.needle_rows(x)) and not torch.equal(n, T.needle_rows(x, seed=1))  # seeded


def test_needle_in_visible_and_blank_form_is_scored_on_the_first_copied_chunk():
    """needle = copy of needle rows (the key's tokens visible one copy distance later), needle_blank = blank copy of
    them; each scored on the first chunk of the second half only, with and without memories."""
    plan, model, x, mask = setup()
    out = evaluate(plan, model, x, mask)
    n = T.needle_rows(x)
    for name, kind in (('needle', 'copy'), ('needle_blank', 'blank_copy')):
        for suffix, ablate in (('', False), ('_ablated', True)):
            ce, acc = by_hand(model, kind, n, mask, ablate, chunk=0)
            assert abs(out[f'{name}{suffix}.ce'] - ce) < 1e-5, (name, suffix)
            assert abs(out[f'{name}{suffix}.token_accuracy'] - acc) < 1e-9, (name, suffix)
    assert abs(out['needle.ce'] - out['copy.ce']) > 1e-4  # a different example from the copy objective's
