"""Verdict rules v2 of the claims suite (benchmarks/paper_claims.py): the statistics and the three-valued tests,
fixed in code before any run of the suite they judge.

Every test returns (outcome, evidence): outcome is 'supported', 'contradicted' or 'inconclusive' (the data cannot
tell: an interval that straddles the margin, too few seeds). A claim is a list of tests plus the positive controls
that must hold for the tests to mean anything (an autoencoder probe that beats an untrained encoder; a memory model
that beats its own ablation): where a control is not supported the claim is inconclusive, whatever its tests say.

- Runs are paired by seed (same seed: same data order); intervals are two-sided t intervals of the per-seed values.
- A >> B (superiority): supported where the 95 % interval of A - B lies above +MUCH_ABS and mean A >= MUCH_RATIO x
  mean B; contradicted where it lies below +MUCH_ABS, or clears it at less than the ratio; else inconclusive.
- A ~ B (equivalence): two one-sided t tests at alpha 0.05 each (TOST; the 90 % interval of A - B inside
  [-SIMILAR_ABS, +SIMILAR_ABS]) supported; contradicted where the 95 % interval lies wholly outside the margin;
  else inconclusive, and the evidence names the smallest margin these seeds could have shown equivalence for.
- A has lower loss than B: the 95 % interval of L_B - L_A above 0 supported, below 0 contradicted, else
  inconclusive with the smallest difference these seeds can detect (the interval's half width).
- Within a margin (loss): the 95 % interval of L / L_ref - 1 below +margin supported, above it contradicted.
- At least / at most a threshold: the 95 % interval of the value on the threshold's side supported, wholly on the
  other side contradicted.
- Fewer than MIN_SEEDS paired seeds: inconclusive, saying so.
"""
from __future__ import annotations

import math

SUPPORTED, CONTRADICTED, INCONCLUSIVE = 'supported', 'contradicted', 'inconclusive'
MUCH_ABS, MUCH_RATIO, SIMILAR_ABS, LM_MARGIN, MIN_SEEDS = 0.20, 2.0, 0.05, 0.05, 3
# Student's t quantiles by degrees of freedom: 0.975 (two-sided 95 % intervals) and 0.95 (one-sided tests at 5 %,
# whose pair is the 90 % interval of TOST)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float('nan')
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided t interval of the mean at `level` (0.95 or 0.90)."""
    m, se = mean_se(values)
    table = T975 if level == 0.95 else T95
    if len(values) < 2:
        return m, -math.inf, math.inf
    half = table.get(len(values) - 1, 1.96 if level == 0.95 else 1.645) * se
    return m, m - half, m + half


def tost(values: list[float], margin: float) -> tuple[float, float, bool]:
    """Two one-sided t tests of |mean| < margin at alpha 0.05 each: (t of H0 mean <= -margin, t of H0 mean >=
    +margin, both rejected). Equivalent to the 90 % interval lying inside (-margin, +margin)."""
    m, se = mean_se(values)
    if len(values) < 2 or se == 0:
        return math.inf, -math.inf, len(values) >= 2 and abs(m) < margin
    crit = T95.get(len(values) - 1, 1.645)
    t_low, t_high = (m + margin) / se, (m - margin) / se
    return t_low, t_high, t_low > crit and t_high < -crit


class Row:
    """One trial's metric over seeds: {seed: value}."""

    def __init__(self, label: str, values: dict[int, float]):
        self.label, self.values = label, values

    @property
    def n(self) -> int:
        return len(self.values)

    def cell(self, digits: int = 3) -> str:
        if not self.values:
            return '-'
        m, se = mean_se(list(self.values.values()))
        return f'{m:.{digits}f} ± {se:.{digits}f}' if self.n > 1 else f'{m:.{digits}f} (1 seed)'

    def mean(self) -> float:
        return mean_se(list(self.values.values()))[0] if self.values else float('nan')

    def error_bar(self) -> float:
        """The standard error, or 0 where one seed gives none (a plot's error bar)."""
        return mean_se(list(self.values.values()))[1] if self.n > 1 else 0.0

    def paired(self, other: Row, fn=lambda a, b: a - b) -> list[float]:
        return [fn(self.values[s], other.values[s]) for s in sorted(self.values) if s in other.values]

    def minus(self, other: Row, label: str) -> Row:
        return Row(label, {s: self.values[s] - other.values[s] for s in self.values if s in other.values})


def enough(*rows: Row) -> str | None:
    short = [r.label for r in rows if r.n < MIN_SEEDS]
    return f"not enough seeds ({', '.join(short)}: fewer than {MIN_SEEDS})" if short else None


def _side(lo: float, hi: float, threshold: float) -> str:
    """supported where the interval lies above the threshold, contradicted where below, else inconclusive."""
    return SUPPORTED if lo > threshold else CONTRADICTED if hi < threshold else INCONCLUSIVE


def much(a: Row, b: Row) -> tuple[str, str]:
    """a >> b."""
    if why := enough(a, b):
        return INCONCLUSIVE, why
    m, lo, hi = interval(a.paired(b))
    ratio_ok = a.mean() >= MUCH_RATIO * b.mean()
    out = _side(lo, hi, MUCH_ABS)
    if out == SUPPORTED and not ratio_ok:
        out = CONTRADICTED
    ratio = f'{a.mean() / b.mean():.1f}x' if b.mean() > 0.005 else f'mean {b.label} {b.mean():+.3f}'
    return out, f'{a.label} - {b.label} = {m:+.3f} [{lo:+.3f}, {hi:+.3f}], {ratio}'


def similar(a: Row, b: Row, margin: float = SIMILAR_ABS) -> tuple[str, str]:
    """a ~ b within ±margin, by TOST at 90 %."""
    if why := enough(a, b):
        return INCONCLUSIVE, why
    d = a.paired(b)
    _, _, equivalent = tost(d, margin)
    m, lo90, hi90 = interval(d, 0.90)
    _, lo, hi = interval(d)
    out = SUPPORTED if equivalent else CONTRADICTED if lo > margin or hi < -margin else INCONCLUSIVE
    return out, (f'{a.label} - {b.label} = {m:+.3f}, 90 % [{lo90:+.3f}, {hi90:+.3f}] (TOST ±{margin:.2f}; '
                 f'smallest margin these seeds show: {max(abs(lo90), abs(hi90)):.3f})')


def lower(a: Row, b: Row) -> tuple[str, str]:
    """a's loss below b's."""
    if why := enough(a, b):
        return INCONCLUSIVE, why
    m, lo, hi = interval(b.paired(a))
    return _side(lo, hi, 0.0), (f'{b.label} - {a.label} = {m:+.3f} [{lo:+.3f}, {hi:+.3f}] nats '
                                f'(smallest detectable: {(hi - lo) / 2:.3f})')


def within(a: Row, ref: Row, margin: float = LM_MARGIN) -> tuple[str, str]:
    """a's loss within `margin` of ref's (the per-seed ratio)."""
    if why := enough(a, ref):
        return INCONCLUSIVE, why
    m, lo, hi = interval(a.paired(ref, lambda x, y: x / y - 1))
    out = SUPPORTED if hi < margin else CONTRADICTED if lo > margin else INCONCLUSIVE
    return out, f'{a.label} / {ref.label} - 1 = {m:+.1%} [{lo:+.1%}, {hi:+.1%}]'


def at_least(a: Row, threshold: float) -> tuple[str, str]:
    if why := enough(a):
        return INCONCLUSIVE, why
    m, lo, hi = interval(list(a.values.values()))
    return _side(lo, hi, threshold), f'{a.label} = {m:.3f} [{lo:.3f}, {hi:.3f}] (>= {threshold:g})'


def at_most(a: Row, threshold: float) -> tuple[str, str]:
    if why := enough(a):
        return INCONCLUSIVE, why
    m, lo, hi = interval(list(a.values.values()))
    flipped = {SUPPORTED: CONTRADICTED, CONTRADICTED: SUPPORTED, INCONCLUSIVE: INCONCLUSIVE}
    return flipped[_side(lo, hi, threshold)], f'{a.label} = {m:.3f} [{lo:.3f}, {hi:.3f}] (<= {threshold:g})'


def beats(a: Row, b: Row, what: str = 'token accuracy') -> tuple[str, str]:
    """a above b (a positive control: a trained probe above an untrained one, a model above its own ablation)."""
    if why := enough(a, b):
        return INCONCLUSIVE, why
    m, lo, hi = interval(a.paired(b))
    return _side(lo, hi, 0.0), f'{a.label} - {b.label} = {m:+.3f} [{lo:+.3f}, {hi:+.3f}] {what}'


def verdict(checks: list[tuple[str, str]], controls: list[tuple[str, str]] = ()) -> tuple[str, str]:
    """A claim's verdict: inconclusive where a positive control is not supported; else contradicted where any test
    is, supported where every test is, inconclusive otherwise. And the evidence: controls first."""
    failed = [t for o, t in controls if o != SUPPORTED]
    shown = [f'control: {t}' for _, t in controls] + [t for _, t in checks]
    if failed:
        return INCONCLUSIVE, f"positive control failed ({'; '.join(failed)}); " + '; '.join(t for _, t in checks)
    outcomes = [o for o, _ in checks]
    word = (CONTRADICTED if CONTRADICTED in outcomes else SUPPORTED if all(o == SUPPORTED for o in outcomes)
            else INCONCLUSIVE)
    return word, '; '.join(shown)
