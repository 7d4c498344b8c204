"""The claims report's statistics and verdict rules (benchmarks/paper_claims.py), checked against hand-computed
values: the verdicts of the suite are only as good as these few functions."""
import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('paper_claims', ROOT / 'benchmarks' / 'paper_claims.py')
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)


def test_mean_standard_error_and_t_interval_by_hand():
    m, se = pc.mean_se([1.0, 2.0, 4.0])  # mean 7/3; sample sd sqrt(7/3); se = sd / sqrt(3)
    assert m == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    mean, lo, hi = pc.interval([1.0, 2.0, 4.0])
    assert (lo, hi) == pytest.approx((7 / 3 - 4.303 * se, 7 / 3 + 4.303 * se))  # t(0.975, 2 degrees of freedom)
    assert pc.interval([5.0])[1:] == (-math.inf, math.inf)  # one value says nothing about spread


def test_differences_pair_runs_by_seed():
    a = pc.Row('a', {1: 0.9, 2: 0.8, 3: 0.7})
    b = pc.Row('b', {3: 0.1, 1: 0.3, 2: 0.2, 4: 0.5})  # seed 4 has no partner: left out
    assert a.paired(b) == pytest.approx([0.6, 0.6, 0.6])
    assert a.minus(b, 'd').values == pytest.approx({1: 0.6, 2: 0.6, 3: 0.6})


def test_much_greater_needs_the_interval_above_the_margin_and_twice_the_mean():
    hi = pc.Row('hi', {1: 0.80, 2: 0.82, 3: 0.78})
    lo = pc.Row('lo', {1: 0.20, 2: 0.25, 3: 0.15})
    assert pc.much(hi, lo)[0] is True
    near = pc.Row('near', {1: 0.62, 2: 0.63, 3: 0.64})  # every difference +0.22, but 1.5x the mean: not >>
    x = pc.Row('x', {1: 0.40, 2: 0.41, 3: 0.42})
    assert pc.interval(near.paired(x))[1] == pytest.approx(0.22) and pc.much(near, x)[0] is False
    noisy = pc.Row('noisy', {1: 0.95, 2: 0.30, 3: 0.90})  # mean difference > 0.2, interval reaches below it
    ok, text = pc.much(noisy, pc.Row('z', {1: 0.05, 2: 0.05, 3: 0.05}))
    assert ok is False and 'noisy - z' in text


def test_similar_is_judged_on_the_interval_not_the_point():
    a = pc.Row('a', {1: 0.30, 2: 0.31, 3: 0.29})
    assert pc.similar(a, pc.Row('b', {1: 0.30, 2: 0.30, 3: 0.30}))[0] is True
    wide = pc.Row('w', {1: 0.40, 2: 0.20, 3: 0.30})  # mean difference 0, interval about +-0.25
    assert pc.similar(wide, pc.Row('b', {1: 0.30, 2: 0.30, 3: 0.30}))[0] is False


def test_within_lower_above_below_and_the_seed_minimum():
    ref = pc.Row('ref', {1: 3.30, 2: 3.31, 3: 3.29})
    assert pc.within(pc.Row('x', {1: 3.40, 2: 3.41, 3: 3.39}), ref)[0] is True  # +3 %
    assert pc.within(pc.Row('y', {1: 3.60, 2: 3.62, 3: 3.58}), ref)[0] is False  # +9 %
    assert pc.lower(ref, pc.Row('n', {1: 3.35, 2: 3.36, 3: 3.34}))[0] is True
    assert pc.lower(ref, ref)[0] is False
    assert pc.above(pc.Row('b', {1: 0.8, 2: 0.82, 3: 0.79}), 0.5)[0] is True
    assert pc.below(pc.Row('b', {1: 0.01, 2: 0.02, 3: 0.015}), 0.05)[0] is True
    ok, why = pc.much(pc.Row('two', {1: 0.9, 2: 0.9}), ref)
    assert ok is None and why == 'not enough seeds (two: fewer than 3)'


def test_a_verdict_needs_every_check():
    assert pc.verdict((True, 'a'), (True, 'b')) == ('yes', 'a; b')
    assert pc.verdict((True, 'a'), (False, 'b'))[0] == 'no'
    assert pc.verdict((False, 'a'), (None, 'b'))[0] == 'undecided'
