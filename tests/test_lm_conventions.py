"""The memspec adapter keeps lm-eval's conventions as lm-eval's own HF model does (runtime/lm_adapter.py): generation
kwargs normalized by lm-eval's normalize_gen_kwargs (max_gen_toks aliases, sampling turned on by a temperature),
causal windows refuse max_gen_toks >= window and warn when they left-truncate, whitespace-only contexts are scored;
bad model arguments are one message (exit 2 through the harness' CLI); runtime.evaluate reports and records
standard errors, refuses an uncached hub task offline with the command that caches it and leaves the user's hub
settings alone; the harness' results are recorded in the run's evaluations table."""
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, db_rows, in_process, rt_env, rt_main, rt_run_dir, rt_run_ids

lm_eval = pytest.importorskip('lm_eval', reason="lm-eval is not installed: pip install -e '.[test,eval]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.utils import normalize_gen_kwargs  # noqa: E402

import runtime.lm_adapter as A  # noqa: E402
from compiler.errors import UserError  # noqa: E402
from runtime import evaluate as E  # noqa: E402
from runtime import scoring as G  # noqa: E402


@pytest.fixture(scope='module')
def lm(flagship_run):
    return A.MemspecLM(run=str(flagship_run.run_dir), device='cpu', batch_size=4)


@pytest.fixture(scope='module')
def full_context(tmp_path_factory, rt_cache):
    out = tmp_path_factory.mktemp('full_context')
    argv = ['specs/full_context.gin', '-b', f"Run.out_dir='{out}'", '-b', f"Data.cache_dir='{rt_cache}'"]
    for b in TINY + ['combined/Stage.steps=2']:
        argv += ['-b', b]
    assert rt_main(argv) == 0
    (run_id,) = rt_run_ids(out)
    return A.MemspecLM(run=str(rt_run_dir(out, run_id)), device='cpu', batch_size=4)


def gen(lm, *pairs):
    return lm.generate_until([Instance(request_type='generate_until', doc={}, arguments=a, idx=i)
                              for i, a in enumerate(pairs)])


class Captured:
    """runtime.generate.generate as the adapter calls it, recording its rows and settings."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = A.generate

        def fake(model, rows, **kw):
            self.calls.append({'rows': [list(r) for r in rows], **kw})
            return real(model, rows, **kw)
        monkeypatch.setattr(A, 'generate', fake)


# ------------------------------------------------------------------------------------------------ gen kwargs

@pytest.mark.parametrize('kwargs', [
    {}, {'max_gen_toks': 5}, {'max_new_tokens': 6}, {'max_tokens': 7}, {'max_completion_tokens': 9},
    {'max_new_tokens': 6, 'max_tokens': 7}, {'max_gen_toks': 3, 'max_new_tokens': 6},
    {'temperature': 0.7}, {'temperature': 0.7, 'do_sample': False}, {'do_sample': True, 'temperature': 0.5},
    {'do_sample': True}, {'until': '\n', 'max_gen_toks': '4'}, {'temperature': 0.9, 'top_k': 5},
])
def test_generation_settings_follow_normalize_gen_kwargs(kwargs):
    (until, max_new, temp, top_k), ignored = A.generation_settings(kwargs)
    ref = normalize_gen_kwargs(dict(kwargs), 256)
    assert max_new == ref['max_gen_toks'] and list(until) == ref['until']
    assert temp == (float(ref.get('temperature', 1.0)) if ref['do_sample'] else 0.0)  # 1: transformers' default
    assert top_k == (kwargs.get('top_k') if temp else None) and ignored == set()


def test_generation_settings_defaults_and_refusals():
    assert A.generation_settings({})[0] == ((), 256, 0.0, None)
    assert A.generation_settings({'temperature': 0.7})[0][2] == 0.7  # sampling on, as lm-eval turns it on
    assert A.generation_settings({'top_p': 0.9})[1] == {'top_p'}
    for bad in ({'max_gen_toks': 'lots'}, {'max_gen_toks': -1}, {'temperature': float('nan')},
                {'temperature': float('inf'), 'do_sample': True}, {'temperature': -0.5, 'do_sample': True},
                {'temperature': 1.0, 'top_k': 0}, {'temperature': 'hot'}):
        with pytest.raises(UserError) as e:
            A.generation_settings(bad)
        assert e.value.what.startswith('max_gen_toks must be an integer >= 0'), bad


def test_max_gen_toks_aliases_bound_the_generation(lm, monkeypatch):
    cap = Captured(monkeypatch)
    ctx = 'Names refer to objects. Names are introduced by name binding operations.'
    out = gen(lm, (ctx, {'until': [], 'max_new_tokens': 5}), (ctx, {'until': [], 'max_tokens': 7}),
              (ctx, {'until': [], 'max_completion_tokens': 3}), (ctx, {'until': []}))
    assert sorted(c['max_new_tokens'] for c in cap.calls) == [3, 5, 7, 256]
    assert all(c['temperature'] == 0.0 for c in cap.calls)
    assert out[0] == gen(lm, (ctx, {'until': [], 'max_gen_toks': 5}))[0]  # the alias is max_gen_toks itself


def test_temperature_without_do_sample_samples(lm, monkeypatch):
    cap = Captured(monkeypatch)
    gen(lm, ('x = 1', {'until': [], 'max_gen_toks': 4, 'temperature': 0.8}),
        ('x = 1', {'until': [], 'max_gen_toks': 4, 'temperature': 0.8, 'do_sample': False}))
    assert sorted(c['temperature'] for c in cap.calls) == [0.0, 0.8]


def test_zero_max_gen_toks_generates_nothing(lm):
    assert gen(lm, ('x = 1', {'until': [], 'max_gen_toks': 0})) == ['']


# ------------------------------------------------------------------------------------------------ causal windows

def test_causal_reading_refuses_max_gen_toks_at_least_its_window(full_context):
    window = full_context.how.window
    for n in (window, window + 1, 256):
        with pytest.raises(UserError) as e:
            gen(full_context, ('x = 1', {'until': [], 'max_gen_toks': n}))
        assert e.value.where == f'max_gen_toks {n}'
        assert e.value.what == (f'a full_context reading holds {window} tokens: generating {n} would leave at most '
                                f'{window - n + 1} of the context')
        assert 'max_gen_toks=N with N < 32 (memspec_reconstruct needs the chunk length, 8)' in e.value.fix


def test_causal_reading_left_truncates_loudly(full_context, monkeypatch, capsys):
    cap = Captured(monkeypatch)
    window, n = full_context.how.window, 8
    long = ' '.join(['names refer to objects'] * 20)
    ids = full_context.tok_encode(long)
    assert len(ids) > window
    capsys.readouterr()
    gen(full_context, (long, {'until': [], 'max_gen_toks': n}), ('x', {'until': [], 'max_gen_toks': n}))
    err = capsys.readouterr().err
    keep = window - n + 1
    assert cap.calls[0]['rows'][0] == ids[-keep:]  # the newest tokens that leave room for n - 1 new ones
    assert cap.calls[0]['rows'][1] == full_context.tok_encode('x')
    assert (f'[memspec] warning: 1 of 2 contexts are longer than the {keep} tokens a {window}-token window leaves '
            f'beside {n} generated ones: their oldest {len(ids) - keep}..{len(ids) - keep} tokens are dropped') in err


# ------------------------------------------------------------------------------------------------ contexts

@pytest.mark.parametrize('context', [' ', '   ', '\n', ' \t '])
def test_whitespace_only_context_is_scored_after_eod(lm, context):
    """lm-eval moves a context's trailing whitespace into the continuation; what is left is empty and is
    conditioned on <eod> (lm-eval's prefix token for an empty context), instead of aborting the evaluation."""
    reqs = [Instance(request_type='loglikelihood', doc={}, arguments=(context, 'Names are'), idx=0),
            Instance(request_type='loglikelihood', doc={}, arguments=('Names', ' are'), idx=1)]
    got = lm.loglikelihood(reqs)
    cont = lm.tok_encode(context + 'Names are')
    (want,) = G.score(lm.model, [[lm.eot_token_id]], [cont], lm.how, None, 4, 'cpu')
    assert got[0][0] == pytest.approx(want.logprob, abs=1e-5) and got[0][1] == want.is_greedy
    assert math.isfinite(got[1][0])
    (rolled,) = lm.loglikelihood_rolling([Instance(request_type='loglikelihood_rolling', doc={},
                                                   arguments=(context,), idx=0)])
    ids = lm.tok_encode(context)
    assert rolled == (pytest.approx(G.score(lm.model, [[lm.eot_token_id]], [ids], lm.how, None, 4, 'cpu')[0].logprob,
                                    abs=1e-5) if ids else 0.0)


# ------------------------------------------------------------------------------------------------ model args

@pytest.mark.parametrize('kwargs, where, what', [
    ({'memory': 'ablatd'}, 'model_args memory=ablatd', "unknown memory mode; did you mean 'ablated'?"),
    ({'memroy': 'ablated'}, 'model_args memroy=ablated',
     "the memspec model has no argument 'memroy': did you mean 'memory'?"),
    ({'keep': 'two'}, 'model_args keep=two', 'keep must be an integer of at least 0'),
    ({'chunk_len': '0'}, 'model_args chunk_len=0', 'chunk_len must be an integer of at least 1'),
])
def test_bad_model_args_are_refused(flagship_run, kwargs, where, what):
    with pytest.raises(UserError) as e:
        A.MemspecLM(run=str(flagship_run.run_dir), device='cpu', **kwargs)
    assert (e.value.where, e.value.what) == (where, what)


def test_harness_cli_bad_model_args_one_message(flagship_run):
    p = subprocess.run([sys.executable, '-m', 'runtime.harness', '--model', 'memspec', '--model_args',
                        f'run={flagship_run.run_dir},memory=bogus', '--include_path', 'specs/eval', '--tasks',
                        'memspec_needle', '--limit', '2', '--device', 'cpu'],
                       cwd=ROOT, env=rt_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-3000:]
    assert p.stderr.endswith('error: model_args memory=bogus: unknown memory mode\n'
                             '  fix: use one of on, ablated, full_context\n')


def test_harness_results_are_recorded_in_the_evaluations_table(flagship_run):
    p = subprocess.run([sys.executable, '-m', 'runtime.harness', '--model', 'memspec', '--model_args',
                        f'run={flagship_run.run_dir},stage=copy,memory=ablated', '--include_path', 'specs/eval',
                        '--tasks', 'memspec_needle', '--limit', '4', '--device', 'cpu'],
                       cwd=ROOT, env=rt_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = db_rows(flagship_run.db, 'SELECT run_id, stage, task, metric, memory, "limit" FROM memspec_evaluations '
                                    "WHERE stage = 'copy' AND \"limit\" = 4 AND memory = 'ablated'")
    assert sorted(rows) == [(flagship_run.run_id, 'copy', 'memspec_needle', m, 'ablated', 4)
                            for m in ('acc', 'acc_stderr')]
    assert f'(memspec_evaluations, run {flagship_run.run_id})' in p.stderr


# ------------------------------------------------------------------------------------------------ runtime.evaluate

def test_evaluate_reports_and_records_standard_errors(flagship_run, capsys):
    code, out, err = in_process(E.main, [flagship_run.run_dir, '--tasks', 'memspec_needle', '--limit', 5,
                                         '--stage', 'copy', '--json'], capsys)  # test_evaluate's stage: same widths
    assert code == 0, err
    (acc,) = [r for r in json.loads(out)['results'] if r['metric'] == 'acc']
    p, n = acc['value'], 5
    assert acc['stderr'] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), abs=1e-12)  # lm-eval's mean_stderr
    got = dict(db_rows(flagship_run.db, 'SELECT metric, value FROM memspec_evaluations WHERE stage = ? AND '
                                        '"limit" = 5 AND memory = \'on\' ORDER BY id', 'copy'))
    assert got['acc'] == p and got['acc_stderr'] == pytest.approx(acc['stderr'], abs=1e-12)


def test_evaluate_numbers_are_range_checked(flagship_run, capsys):
    for flag, value, says in (('--limit', '0', '0 is out of range: give an integer between 1 and 1000000000'),
                              ('--batch-size', '-2', '-2 is out of range: give an integer between 1 and 65536'),
                              ('--bootstrap-iters', 'x', "'x' is not an integer")):
        code, out, err = in_process(E.main, [flagship_run.run_dir, '--tasks', 'memspec', flag, value], capsys)
        assert code == 2 and out == '' and 'Traceback' not in err
        assert err.splitlines()[-1] == f'python -m runtime.evaluate: error: argument {flag}: {says}'


def test_evaluate_offline_uncached_task_is_one_message(flagship_run, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    code, out, err = in_process(E.main, [flagship_run.run_dir, '--tasks', 'hellaswag', '--limit', 5], capsys)
    assert code == 2 and out == '' and 'Traceback' not in err
    assert err.startswith('error: --tasks hellaswag: its dataset is not in the local cache and the hub is off '
                          '(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): ')
    assert err.endswith('  fix: cache it once where the network is reachable: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 '
                        'python -c "from lm_eval.tasks import TaskManager; TaskManager().load([\'hellaswag\'])"\n')
    assert db_rows(flagship_run.db, "SELECT COUNT(*) FROM memspec_evaluations WHERE task = 'hellaswag'") == [(0,)]


def test_evaluate_leaves_the_users_hub_setting_alone(flagship_run, capsys, monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    code, _, err = in_process(E.main, [flagship_run.run_dir, '--tasks', 'memspec_nope'], capsys)
    assert code == 2 and err.startswith('error: --tasks memspec_nope: unknown task memspec_nope')
    assert 'HF_HUB_OFFLINE' not in os.environ
