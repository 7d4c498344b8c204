"""Objectives (compiler/objectives.py): golden (input, key mask, labels) triples, metrics on hand-made cases,
loss combination."""
import math

import pytest
import torch
import torch.nn.functional as F

from compiler import objectives as O
from compiler.plan import Objective, Stage

I = O.IGNORE
IDS = O.SpecialIds(pad=0, blank=1, copy=2)


def t(x):
    return torch.tensor(x)


TOKENS = torch.arange(10, 22).view(1, 4, 3)  # chunks [10 11 12] [13 14 15] [16 17 18] [19 20 21]

GOLDEN = {
    'clm': ([[[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]]],
            [[[11, 12, I], [14, 15, I], [17, 18, I], [20, 21, I]]]),
    'autoencode': ([[[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]]],
                   [[[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]]]),
    'copy': ([[[10, 11, 12], [13, 14, 15], [10, 11, 12], [13, 14, 15]]],
             [[[I, I, I], [I, I, I], [11, 12, I], [14, 15, I]]]),
    'blank_copy': ([[[10, 11, 12], [13, 14, 15], [1, 1, 1], [1, 1, 1]]],
                   [[[I, I, I], [I, I, I], [11, 12, I], [14, 15, I]]]),
}


@pytest.mark.parametrize('kind', list(GOLDEN))
def test_golden_examples(kind):
    inputs, mask, labels = O.make_example(Objective(kind=kind), TOKENS, None, IDS)
    exp_inputs, exp_labels = GOLDEN[kind]
    assert torch.equal(inputs, t(exp_inputs))
    assert torch.equal(labels, t(exp_labels))
    assert mask is None


def test_retrieval_uses_clm_labels():
    _, _, labels = O.make_example(Objective(kind='retrieval'), TOKENS, None, IDS)
    assert torch.equal(labels, t(GOLDEN['clm'][1]))


TOKENS5 = torch.arange(10, 30).view(1, 4, 5)  # chunks [10..14] [15..19] [20..24] [25..29]


@pytest.mark.parametrize('kind,exp_inputs,exp_labels', [
    ('copy',
     [[[10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [2, 2, 2, 13, 14], [15, 16, 17, 18, 19]]],
     [[[I, I, I, I, I], [I, I, I, I, I], [I, I, I, 14, I], [16, 17, 18, 19, I]]]),
    ('blank_copy',
     [[[10, 11, 12, 13, 14], [15, 16, 17, 18, 19], [2, 2, 2, 1, 1], [1, 1, 1, 1, 1]]],
     [[[I, I, I, I, I], [I, I, I, I, I], [I, I, I, 14, I], [16, 17, 18, 19, I]]]),
])
def test_golden_copy_with_delimiter(kind, exp_inputs, exp_labels):
    """delimiter=3: the first 3 positions of the copy become the copy token, their labels are ignored."""
    inputs, mask, labels = O.make_example(Objective(kind=kind, delimiter=3), TOKENS5, None, IDS)
    assert torch.equal(inputs, t(exp_inputs))
    assert torch.equal(labels, t(exp_labels))
    assert mask is None


# two rows: row 0 unpadded (10..21), row 1 with right padding (pad id 0) of different length per chunk
PADDED = t([[[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]],
            [[30, 31, 0], [33, 0, 0], [36, 37, 38], [39, 40, 0]]])
MASK = t([[[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]],
          [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]]).bool()

GOLDEN_MASKED = {
    'clm': (PADDED.tolist(), MASK.tolist(),
            [[[11, 12, I], [14, 15, I], [17, 18, I], [20, 21, I]],
             [[31, I, I], [I, I, I], [37, 38, I], [40, I, I]]]),
    'autoencode': (PADDED.tolist(), MASK.tolist(),
                   [[[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20, 21]],
                    [[30, 31, I], [33, I, I], [36, 37, 38], [39, 40, I]]]),
    'copy': ([[[10, 11, 12], [13, 14, 15], [10, 11, 12], [13, 14, 15]],
              [[30, 31, 0], [33, 0, 0], [30, 31, 0], [33, 0, 0]]],
             [[[1, 1, 1]] * 4,
              [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]],
             [[[I, I, I], [I, I, I], [11, 12, I], [14, 15, I]],
              [[I, I, I], [I, I, I], [31, I, I], [I, I, I]]]),
    'blank_copy': ([[[10, 11, 12], [13, 14, 15], [1, 1, 1], [1, 1, 1]],
                    [[30, 31, 0], [33, 0, 0], [1, 1, 0], [1, 0, 0]]],
                   [[[1, 1, 1]] * 4,
                    [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]],
                   [[[I, I, I], [I, I, I], [11, 12, I], [14, 15, I]],
                    [[I, I, I], [I, I, I], [31, I, I], [I, I, I]]]),
}


@pytest.mark.parametrize('kind', list(GOLDEN_MASKED))
def test_golden_examples_with_padding(kind):
    """Padding labels are ignored; copies carry the first half's key mask; blanks only where tokens were real."""
    inputs, mask, labels = O.make_example(Objective(kind=kind), PADDED, MASK, IDS)
    exp_inputs, exp_mask, exp_labels = GOLDEN_MASKED[kind]
    assert torch.equal(inputs, t(exp_inputs))
    assert torch.equal(mask, t(exp_mask).bool())
    assert torch.equal(labels, t(exp_labels))
    assert not (labels[~mask] != I).any()  # no label on a padding position


@pytest.mark.parametrize('delimiter', [0, 2])
@pytest.mark.parametrize('kind', ['clm', 'autoencode', 'copy', 'blank_copy', 'retrieval'])
@pytest.mark.parametrize('masked', [False, True])
def test_inputs_are_not_mutated(kind, masked, delimiter):
    tokens, mask = PADDED.clone(), MASK.clone() if masked else None
    obj = Objective(kind=kind, delimiter=delimiter if kind in ('copy', 'blank_copy') else 0)
    inputs, new_mask, labels = O.make_example(obj, tokens, mask, IDS)
    assert torch.equal(tokens, PADDED)
    assert mask is None or torch.equal(mask, MASK)
    assert labels.shape == inputs.shape == tokens.shape


# --- metrics -----------------------------------------------------------------------------------------------------

# 3 samples x 1 chunk x 3 positions, vocabulary 4; logits = log-probabilities so the CE is known in closed form
PROBS = t([[[[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]],
           [[[0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1]]],
           [[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]]])
LABELS = t([[[0, 2, I]],     # hit, miss (argmax 1), ignored
            [[3, 0, 2]],     # hit, hit, miss (argmax 1)
            [[I, I, I]]])    # nothing to score: not a sample
CE = -(math.log(0.7) + math.log(0.2) + math.log(0.7) + math.log(0.4) + math.log(0.2)) / 5


def test_tally_metrics_hand_computed():
    logits = PROBS.log()
    tally = O.Tally()
    tally.add(logits, LABELS)
    m = tally.metrics(vocab=4, bytes_per_token=3.5)
    assert tally.tokens == 5 and tally.correct == 3 and tally.samples == 2
    assert m['token_accuracy'] == pytest.approx(3 / 5)
    # macro mean over samples of (1 - accuracy): (1 - 1/2 + 1 - 2/3) / 2 = 5/12, not the micro 1 - 3/5 = 0.4
    assert m['normalized_hamming'] == pytest.approx(5 / 12)
    assert m['ce'] == pytest.approx(CE, rel=1e-6)
    assert m['info_proportion'] == pytest.approx(1 - CE / math.log(4), rel=1e-6)
    assert m['bits_per_byte'] == pytest.approx(CE / math.log(2) / 3.5, rel=1e-6)
    assert 'bits_per_byte' not in tally.metrics(vocab=4)


def test_tally_accumulates_over_batches_and_mutates_nothing():
    logits, labels = PROBS.log(), LABELS.clone()
    whole = O.Tally()
    whole.add(logits, labels)
    parts = O.Tally()
    for i in range(3):
        parts.add(logits[i:i + 1], labels[i:i + 1])
    for k, v in whole.metrics(4, 2.0).items():
        assert parts.metrics(4, 2.0)[k] == pytest.approx(v)
    assert torch.equal(labels, LABELS) and torch.equal(logits, PROBS.log())
    assert O.Tally().metrics(4) == {}


def test_token_loss_ignores_padding():
    """token_loss takes the hidden states and the head's weight: with an identity head they are the logits."""
    loss, acc = O.token_loss(PROBS.log(), torch.eye(4), LABELS)
    assert loss.item() == pytest.approx(CE, rel=1e-6)
    assert acc.item() == pytest.approx(3 / 5)
    loss, acc = O.token_loss(torch.zeros(1, 1, 2, 8), torch.eye(8), t([[[3, I]]]))
    assert loss.item() == pytest.approx(math.log(8), rel=1e-6)
    loss, acc = O.token_loss(PROBS.log(), torch.eye(4), torch.full_like(LABELS, I))  # no target at all: 0, not NaN
    assert loss.item() == 0.0 and acc.item() == 0.0


def _head_case(rows=37, d=16, vocab=53, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g, dtype=dtype)
    w = torch.randn(vocab, d, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::5] = I  # rows without a target
    return h, w, labels


@pytest.mark.parametrize('tile', [1, 4, 7, 36, 37, 1000])
@pytest.mark.parametrize('grads', ['both', 'hidden only', 'weight only'])
def test_head_cross_entropy_equals_the_reference_loss_gradients_and_argmax(tile, grads):
    """The tiled head + cross-entropy against F.cross_entropy on the full fp32 logits: the summed loss, the
    gradients of the hidden states and of the head's weight (scaled by an upstream gradient, as a weighted mean
    of objectives does), and the argmax of every row, for tiles that do and do not divide the rows, and with the
    head or the hidden states frozen."""
    h, w, labels = _head_case()
    ours_h, ours_w = h.clone().requires_grad_(grads != 'weight only'), w.clone().requires_grad_(grads != 'hidden only')
    ref_h, ref_w = h.clone().requires_grad_(grads != 'weight only'), w.clone().requires_grad_(grads != 'hidden only')
    nll, pred = O.head_cross_entropy(ours_h, ours_w, labels, tile)
    (nll * 0.37).backward()
    logits = ref_h @ ref_w.T
    ref = F.cross_entropy(logits, labels, ignore_index=I, reduction='sum')
    (ref * 0.37).backward()
    torch.testing.assert_close(nll, ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(pred, logits.argmax(-1))
    for ours, theirs in ((ours_h, ref_h), (ours_w, ref_w)):
        if theirs.requires_grad:
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
        else:
            assert ours.grad is None


def test_head_cross_entropy_is_exact_in_double_precision_and_without_gradients():
    h, w, labels = _head_case(dtype=torch.float64)
    h.requires_grad_()
    w.requires_grad_()
    with torch.no_grad():
        nll, pred = O.head_cross_entropy(h, w, labels.view(37, 1), 5)  # any label shape: rows are flattened
    ref = F.cross_entropy(h @ w.T, labels, ignore_index=I, reduction='sum')
    assert nll.dtype == torch.float64 and not nll.requires_grad
    torch.testing.assert_close(nll, ref, rtol=1e-12, atol=1e-12)
    assert pred.shape == (37, 1)


def test_head_cross_entropy_never_holds_the_logits_of_all_rows():
    """No tensor of the forward or backward pass is as large as the logits of all rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(x, torch.Tensor):
                    Largest.numel = max(Largest.numel, x.numel())
            return out

    h, w, labels = _head_case(rows=64, vocab=50)
    h.requires_grad_()
    w.requires_grad_()
    with Largest():
        nll, _ = O.head_cross_entropy(h, w, labels, tile=8)
        nll.backward()
    assert Largest.numel < 64 * 50  # the largest is the hidden states' gradient (64 x 16); a tile's logits: 8 x 50
    Largest.numel = 0
    with Largest():
        F.cross_entropy(h @ w.T, labels, ignore_index=I, reduction='sum').backward()
    assert Largest.numel == 64 * 50  # the reference does


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (benchmarks/gpu_check.sh runs it)')
def test_head_cross_entropy_under_bf16_autocast_matches_the_reference():
    """As the GPU trains (bf16 autocast): the head's matmuls run in bf16, the softmax in fp32, like
    F.cross_entropy(logits.float()) on bf16 logits; gradients come back in the parameters' fp32."""
    h, w, labels = (x.cuda() for x in _head_case(rows=300, d=64, vocab=1000))
    grads = []
    for ours in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            if ours:
                nll, pred = O.head_cross_entropy(hh, ww, labels, tile=64)
            else:
                logits = hh @ ww.T
                nll = F.cross_entropy(logits.float(), labels, ignore_index=I, reduction='sum')
                pred = logits.argmax(-1)
        nll.backward()
        grads.append((nll.detach(), pred, hh.grad, ww.grad))
    (n0, p0, gh0, gw0), (n1, p1, gh1, gw1) = grads
    assert n0.dtype == torch.float32 and gh0.dtype == gw0.dtype == torch.float32
    torch.testing.assert_close(n0, n1, rtol=1e-3, atol=1e-2)
    assert (p0 == p1).float().mean() > 0.99  # bf16 ties may break differently
    torch.testing.assert_close(gh0, gh1, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw0, gw1, rtol=2e-2, atol=2e-3)


def test_target_positions_cover_every_label():
    """The head skips only positions that can never have a target (the last of a chunk when labels shift)."""
    for kind in ('clm', 'autoencode', 'copy', 'blank_copy', 'retrieval'):
        _, _, labels = O.make_example(Objective(kind=kind, delimiter=2 if 'copy' in kind else 0), PADDED, MASK, IDS)
        skipped = torch.ones(labels.shape[-1], dtype=torch.bool)
        skipped[O.target_positions(Objective(kind=kind))] = False
        assert (labels[..., skipped] == I).all()
        assert skipped.sum() == (kind != 'autoencode')


def test_shifted_labels_matches_cross_entropy_convention():
    """labels[..., t] is the target of logits[..., t]: a model that copies its next input scores perfectly."""
    tokens = PADDED
    labels = O.shifted_labels(tokens, MASK)
    oracle = F.one_hot(tokens.roll(-1, -1), 50).float() * 100
    tally = O.Tally()
    tally.add(oracle, labels)
    assert tally.metrics(50)['token_accuracy'] == 1.0


# --- combination -------------------------------------------------------------------------------------------------

LOSSES = {'clm': torch.tensor(2.0), 'copy': torch.tensor(3.0), 'blank_copy': torch.tensor(5.0)}


def test_combine_weighted_sum():
    stage = Stage(objectives=(Objective(kind='clm', weight=2.0), Objective(kind='blank_copy', weight=0.25)))
    assert O.combine(LOSSES, stage).item() == pytest.approx(2 * 2.0 + 0.25 * 5.0)
    stage = Stage(objectives=(Objective(kind='clm'), Objective(kind='copy'), Objective(kind='blank_copy', weight=0.0)))
    assert O.combine(LOSSES, stage).item() == pytest.approx(5.0)


@pytest.mark.parametrize('copy_kind', ['copy', 'blank_copy'])
def test_combine_faithful(copy_kind):
    """The research code's accident: clm_mean + 0.5 * copy_mean, whatever the declared weights."""
    stage = Stage(normalize='faithful',
                  objectives=(Objective(kind='clm', weight=1.0), Objective(kind=copy_kind, weight=1.0)))
    losses = {'clm': LOSSES['clm'], copy_kind: LOSSES[copy_kind]}
    assert O.combine(losses, stage).item() == pytest.approx(2.0 + 0.5 * LOSSES[copy_kind].item())
    weighted = Stage(objectives=stage.objectives)
    assert O.combine(losses, weighted).item() == pytest.approx(2.0 + LOSSES[copy_kind].item())


def test_combine_keeps_gradients():
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    stage = Stage(objectives=(Objective(kind='clm', weight=3.0), Objective(kind='copy', weight=0.5)))
    O.combine({'clm': a, 'copy': b}, stage).backward()
    assert a.grad.item() == 3.0 and b.grad.item() == 0.5


def _direct_counts(train, mask, vocab: int):
    """Unigram counts (add-one) and bigram counts of the unmasked tokens, pairs within a chunk, loop by loop."""
    uni = [1.0] * vocab
    pair = [[0.0] * vocab for _ in range(vocab)]
    examples, chunks, length = train.shape
    for e in range(examples):
        for c in range(chunks):
            for t in range(length):
                if mask[e, c, t]:
                    uni[int(train[e, c, t])] += 1
                if t < length - 1 and mask[e, c, t] and mask[e, c, t + 1]:
                    pair[int(train[e, c, t])][int(train[e, c, t + 1])] += 1
    return uni, pair


def _direct_targets(val, mask):
    """(previous token or None, token) of every unmasked held-out token; clm: those with a previous token."""
    clm, every = [], []
    examples, chunks, length = val.shape
    for e in range(examples):
        for c in range(chunks):
            for t in range(length):
                if mask[e, c, t]:
                    prev = int(val[e, c, t - 1]) if t and mask[e, c, t - 1] else None
                    every.append((prev, int(val[e, c, t])))
                    if prev is not None:
                        clm.append((prev, int(val[e, c, t])))
    return clm, every


def test_floors_equal_a_direct_count_of_unigram_and_bigram_statistics():
    """Unigram and bigram floors against a dense, loop-by-loop recomputation on a small random corpus (pairs never
    cross a chunk boundary or padding; the bigram shrinks counts toward the unigram with weight `prior`)."""
    import math

    from compiler.objectives import floors
    g = torch.Generator().manual_seed(0)
    vocab, prior = 7, 3.0
    train = torch.randint(0, vocab, (40, 2, 5), generator=g)
    train_mask = torch.rand(40, 2, 5, generator=g) > 0.2
    val = torch.randint(0, vocab, (9, 2, 5), generator=g)
    val_mask = torch.ones_like(val, dtype=torch.bool)
    val_mask[0, 1, 3:] = False
    uni, pair = _direct_counts(train, train_mask, vocab)
    p_uni = [u / sum(uni) for u in uni]

    def p_bi(a, b):
        return (pair[a][b] + prior * p_uni[b]) / (sum(pair[a]) + prior)

    clm, every = _direct_targets(val, val_mask)

    def expect(targets, bigram):
        ce = acc = 0.0
        for prev, b in targets:
            if bigram and prev is not None:
                p = p_bi(prev, b)
                guess = max(range(vocab), key=lambda x: p_bi(prev, x))
            else:
                p, guess = p_uni[b], max(range(vocab), key=lambda x: p_uni[x])
            ce -= math.log(p)
            acc += guess == b
        return ce / len(targets), acc / len(targets)

    got = floors(train, train_mask, val, val_mask, vocab, prior)
    for kind, targets in (('clm', clm), ('autoencode', every)):
        for model in ('unigram', 'bigram'):
            ce, acc = expect(targets, model == 'bigram')
            assert got[kind][model]['ce'] == pytest.approx(ce, rel=1e-9), (kind, model)
            assert got[kind][model]['token_accuracy'] == pytest.approx(acc), (kind, model)
