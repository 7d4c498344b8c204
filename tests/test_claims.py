"""The claims report's statistics and verdict rules v2 (benchmarks/claims_rules.py, used by
benchmarks/paper_claims.py), checked against hand-computed values: the verdicts of the suite are only as good as these
few functions. Every rule is shown to reach each of its three outcomes, and a failed positive control to make a claim
inconclusive whatever its tests say."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import claims_rules as R  # noqa: E402

spec = importlib.util.spec_from_file_location('paper_claims', ROOT / 'benchmarks' / 'paper_claims.py')
pc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pc)

S, C, I = R.SUPPORTED, R.CONTRADICTED, R.INCONCLUSIVE


def row(label, *values):
    return R.Row(label, {seed: v for seed, v in enumerate(values, 1)})


def test_mean_standard_error_and_t_intervals_by_hand():
    m, se = R.mean_se([1.0, 2.0, 4.0])  # mean 7/3; sample sd sqrt(7/3); se = sd / sqrt(3)
    assert m == pytest.approx(7 / 3) and se == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert R.interval([1.0, 2.0, 4.0])[1:] == pytest.approx((7 / 3 - 4.303 * se, 7 / 3 + 4.303 * se))  # t(.975, 2)
    assert R.interval([1.0, 2.0, 4.0], 0.90)[1:] == pytest.approx((7 / 3 - 2.920 * se, 7 / 3 + 2.920 * se))  # t(.95)
    assert R.interval([5.0])[1:] == (-math.inf, math.inf)  # one value says nothing about spread


def test_tost_by_hand_and_its_equivalence_to_the_90_percent_interval():
    se = 0.01 / math.sqrt(3)  # values 0.01, 0.02, 0.03: mean 0.02, sd 0.01
    t_low, t_high, ok = R.tost([0.01, 0.02, 0.03], 0.05)
    assert (t_low, t_high) == pytest.approx((0.07 / se, -0.03 / se)) and ok  # 12.12 > 2.920 and -5.20 < -2.920
    # mean 0, se 0.0144: the 90 % interval (±0.042) is inside ±0.05, the 95 % one (±0.062) is not: TOST at 90 %
    # says equivalent where the v1 rule (95 %) could not
    d = [-0.025, 0.0, 0.025]
    assert R.tost(d, 0.05)[2] and R.interval(d)[2] > 0.05 and R.interval(d, 0.90)[2] < 0.05
    assert not R.tost([0.0, 0.1, 0.2], 0.05)[2]


def test_differences_pair_runs_by_seed():
    a = R.Row('a', {1: 0.9, 2: 0.8, 3: 0.7})
    b = R.Row('b', {3: 0.1, 1: 0.3, 2: 0.2, 4: 0.5})  # seed 4 has no partner: left out
    assert a.paired(b) == pytest.approx([0.6, 0.6, 0.6])
    assert a.minus(b, 'd').values == pytest.approx({1: 0.6, 2: 0.6, 3: 0.6})


def test_much_greater_three_outcomes():
    lo = row('lo', 0.20, 0.25, 0.15)
    assert R.much(row('hi', 0.80, 0.82, 0.78), lo)[0] == S
    assert R.much(row('same', 0.21, 0.26, 0.16), lo)[0] == C  # interval of +0.01 below +0.20
    noisy = row('noisy', 0.95, 0.30, 0.90)  # mean difference > 0.2, interval reaches below it
    outcome, text = R.much(noisy, row('z', 0.05, 0.05, 0.05))
    assert outcome == I and 'noisy - z' in text
    near, x = row('near', 0.62, 0.63, 0.64), row('x', 0.40, 0.41, 0.42)  # every difference +0.22 but 1.5x the mean
    assert R.interval(near.paired(x))[1] == pytest.approx(0.22) and R.much(near, x)[0] == C


def test_similar_three_outcomes_by_tost():
    b = row('b', 0.30, 0.30, 0.30)
    outcome, text = R.similar(row('a', 0.275, 0.30, 0.325), b)  # the 90 % interval ±0.042 inside ±0.05
    assert outcome == S and 'smallest margin these seeds show: 0.042' in text
    assert R.similar(row('w', 0.40, 0.20, 0.30), b)[0] == I  # mean difference 0, interval about ±0.25
    assert R.similar(row('far', 0.60, 0.61, 0.59), b)[0] == C  # +0.30 [+0.275, +0.325]: wholly outside


def test_lower_within_and_thresholds_three_outcomes():
    ref = row('ref', 3.30, 3.31, 3.29)
    assert R.lower(ref, row('n', 3.35, 3.36, 3.34))[0] == S
    assert R.lower(row('n', 3.35, 3.36, 3.34), ref)[0] == C
    outcome, text = R.lower(ref, row('wide', 3.10, 3.60, 3.30))
    assert outcome == I and 'smallest detectable' in text
    assert R.within(row('x', 3.40, 3.41, 3.39), ref)[0] == S  # +3 %
    assert R.within(row('y', 3.60, 3.62, 3.58), ref)[0] == C  # +9 %
    assert R.within(row('z', 3.30, 3.60, 3.45), ref)[0] == I  # +4.5 % with a wide interval
    assert R.at_least(row('b', 0.8, 0.82, 0.79), 0.5)[0] == S
    assert R.at_least(row('b', 0.3, 0.32, 0.29), 0.5)[0] == C
    assert R.at_least(row('b', 0.3, 0.7, 0.5), 0.5)[0] == I
    assert R.at_most(row('b', 0.01, 0.02, 0.015), 0.05)[0] == S
    assert R.at_most(row('b', 0.31, 0.32, 0.3), 0.05)[0] == C
    assert R.beats(row('a', 0.5, 0.6, 0.55), row('u', 0.2, 0.2, 0.2))[0] == S
    outcome, why = R.much(row('two', 0.9, 0.9), ref)
    assert outcome == I and why == 'not enough seeds (two: fewer than 3)'


def test_a_verdict_needs_every_check_and_every_positive_control():
    assert R.verdict([(S, 'a'), (S, 'b')]) == (S, 'a; b')
    assert R.verdict([(S, 'a'), (C, 'b')])[0] == C
    assert R.verdict([(S, 'a'), (I, 'b')])[0] == I
    assert R.verdict([(C, 'a'), (I, 'b')])[0] == C  # one test contradicted is enough
    word, text = R.verdict([(S, 'a')], [(S, 'ctl')])
    assert (word, text) == (S, 'control: ctl; a')
    for failed in (C, I):  # a control not supported: nothing can be read from the tests, either way
        word, text = R.verdict([(S, 'a')], [(failed, 'ae - untrained = -0.001')])
        assert word == I and text.startswith('positive control failed (ae - untrained = -0.001)')
        assert R.verdict([(C, 'a')], [(failed, 'x')])[0] == I


def test_the_32_token_probe_claim_is_inconclusive_when_the_autoencoder_never_trained():
    """The v1 report read this claim as 'no'; under v2 a probe no better than untrained fails its positive control."""
    ae, ca, un = row('ae', 0.055, 0.053, 0.057), row('causal', 0.052, 0.049, 0.055), row('untrained', 0.056, 0.054,
                                                                                           0.058)
    assert R.verdict([R.much(ae, ca), R.similar(ca, un)], [R.beats(ae, un)])[0] == I


def test_references_are_matched_by_clm_updates_and_by_flops():
    s = type('Suite', (), {})()
    s.budget = {'curriculum': (1400, 18.2e12), 'mem_clm': (600, 3.9e12), 'mem_clm_u1400': (1400, 9.0e12),
                'mem_clm_u1800': (1800, 11.6e12), 'mem_clm_flops': (2900, 18.7e12)}
    assert pc.reference(s, 'curriculum', 0) == ('mem_clm_u1400', 'clm updates x 1.00')
    assert pc.reference(s, 'curriculum', 1) == ('mem_clm_flops', 'FLOPs x 1.03')
    assert pc.reference(s, 'other', 0) == ('mem_clm', 'budget unknown')


def test_the_report_renders_every_claim_from_held_out_seeds_and_shows_the_tuning_seed_only_as_a_pilot(tmp_path):
    s = object.__new__(pc.Suite)
    metrics = {'clm.ce': 3.3, 'clm_ablated.ce': 3.4, 'blank_copy.token_accuracy': 0.9,
               'blank_copy_ablated.token_accuracy': 0.01, 'copy.token_accuracy': 0.7,
               'copy_ablated.token_accuracy': 0.3,
               'needle.token_accuracy': 0.85, 'needle_ablated.token_accuracy': 0.1, 'clm.ce.chunk0': 3.5,
               'clm_ablated.ce.chunk0': 3.5}
    s.stages = {t: {seed: {'combined': {k: v + 0.001 * seed for k, v in metrics.items()}} for seed in (1, 2, 3)}
                for t in ('curriculum', 'mem_clm', 'mem_clm_u1400')}
    s.tuning = {'curriculum': {0: {'combined': {'clm.ce': 9.999}}}}
    s.curves, s.floors, s.runs, s.scales = {}, {}, [], [1.0]
    s.corpora = {'docs/corpus.jsonl': 4892143}
    s.budget = {'curriculum': (1400, 18e12), 'mem_clm': (600, 4e12), 'mem_clm_u1400': (1400, 9e12)}
    text = pc.report(s, tmp_path)
    assert 'Corpus: docs/corpus.jsonl (4,892,143 training tokens). Budget' in text
    # the verdicts lead, then the rules, then the evidence
    assert text.index('## Claims') < text.index('## Verdict rules') < text.index('## Information probes')
    claims = text.split('## Claims')[1].split('## Verdict rules')[0]
    rows = [line for line in claims.split('\n') if line.startswith('| ')][1:]  # below the header row
    outcomes = [line.split(' | ')[1] for line in rows]
    counts = claims.split('\n')[0]  # the heading counts each outcome
    assert counts.endswith(f"{outcomes.count('supported')} supported, {outcomes.count('contradicted')} contradicted, "
                           f"{outcomes.count('inconclusive')} inconclusive, {outcomes.count('not run')} not run")
    assert set(outcomes) <= {'supported', 'contradicted', 'inconclusive', 'not run'}  # three outcomes, or not judged
    # a claim whose trials did not run is listed, never judged: no verdict from an empty row
    memclm = next(line for line in claims.split('\n') if 'on the clm-only memory model\'s encoder <<' in line)
    assert memclm.endswith('| not run | trials not in this run of the suite: curriculum_memclm |')
    probe8 = next(line for line in claims.split('\n') if line.startswith('| transformer, 8-token chunks'))
    assert probe8.endswith('trials not in this run of the suite: probe8_ae, probe8_causal_matched, probe8_untrained |')
    assert outcomes.count('not run') == sum(1 for line in claims.split('\n') if 'trials not in this run' in line)
    shipped = next(line for line in claims.split('\n') if line.startswith('| the shipped flagship'))
    assert 'curriculum clm / mem_clm_u1400 clm - 1 = +0.0%' in shipped
    assert '(clm updates x 1.00)' in shipped and '(FLOPs x 0.50)' in shipped  # both matches, and how well
    assert shipped.split(' | ')[1] == 'supported'  # the synthetic numbers clear every gate and control
    assert text.count('9.999') == 1 and '9.999' in text.split('## Pilot runs')[1]  # the tuning seed: pilots only
    assert '| chunk0 |' in text and (tmp_path / 'paper_claims.md').read_text() == text


def test_the_budget_run_time_counts_only_the_budget_trials():
    """The 120-minute budget is read off CORE_TRIALS' runs: a trial run later with --all-trials must not stretch it."""
    import datetime as dt
    t0 = dt.datetime(2026, 1, 1)

    def run(trial, start, minutes):
        r = type('Run', (), {})()
        r.config, r.start = {'sweep': {'trial': trial}}, t0 + dt.timedelta(minutes=start)
        r.stop = r.start + dt.timedelta(minutes=minutes)
        return r
    s = object.__new__(pc.Suite)
    s.runs = [run('curriculum', 0, 5), run('visible', 3, 10), run('curriculum_memclm', 100, 4)]
    assert pc.Suite.wall(s, pc.CORE_TRIALS) == (2, 15.0, 13.0)
    assert pc.Suite.wall(s) == (3, 19.0, 104.0)


@pytest.mark.parametrize('argv, message', [
    (['--report-only'], 'no run database at'),  # nothing recorded yet
    (['--extra-trials', 'probe8_ae,a/b'], "--extra-trials probe8_ae,a/b: 'a/b' is not a trial name"),
])
def test_the_suite_script_refuses_bad_input_with_one_message(tmp_path, argv, message):
    p = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'paper_claims.py'), '--runs', str(tmp_path / 'runs'),
                        '--out', str(tmp_path / 'out'), *argv], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and 'Traceback' not in p.stderr and message in p.stderr, p.stderr
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'out').exists()  # nothing written
