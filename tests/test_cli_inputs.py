"""Bad numbers on every CLI of runtime/ and store/ end in one argparse message and exit 2 before any work (the class:
non-finite, negative, zero where meaningless, absurdly large, not a number), sampling at any accepted temperature
draws a token, `store.analyze retrieve --n` beyond the stored chunks is refused, and `runtime.generate` reads a folder
that `python -m store.export` wrote, the same continuation as from the run folder."""
import json
import math

import pytest
import torch
from conftest import argparse_error, in_process

from runtime import generate as G
from runtime.sampling import sample
from store import analyze as A
from store import export as X

BAD = {  # value: what argparse says after 'argument FLAG: '
    'nan': 'nan is not a finite number', 'inf': 'inf is not a finite number', '-inf': '-inf is not a finite number',
    'x': "'x' is not a number", '1e400': '1e400 is not a finite number',
}


@pytest.mark.parametrize('flag, value, says', [
    ('--max-new-tokens', '1000000000000', '1000000000000 is out of range: give an integer between 1 and 65536'),
    ('--max-new-tokens', '0', '0 is out of range: give an integer between 1 and 65536'),
    ('--max-new-tokens', '-5', '-5 is out of range: give an integer between 1 and 65536'),
    ('--max-new-tokens', '2.5', "'2.5' is not an integer"),
    ('--temperature', '-1', '-1 is out of range: give a number between 0 and 10000'),
    ('--temperature', '1e5', '1e5 is out of range: give a number at most 10000'),
    ('--top-k', '0', '0 is out of range: give an integer between 1 and 2147483647'),
    ('--seed', '-1', '-1 is out of range: give an integer between 0 and 9223372036854775807'),
    ('--seed', str(2 ** 64), f'{2 ** 64} is out of range: give an integer between 0 and 9223372036854775807'),
] + [('--temperature', v, s) for v, s in BAD.items()])
def test_generate_numbers(capsys, flag, value, says):
    assert argparse_error(capsys, G.main, ['0', '--prompt', 'x', f'{flag}={value}']) == \
        f'python -m runtime.generate: error: argument {flag}: {says}'


@pytest.mark.parametrize('argv, says', [
    (['retrieve', '0', '--n=0'], 'retrieve: error: argument --n: 0 is out of range: give an integer between 1 and '
                                 '1000000000'),
    (['retrieve', '0', '--queries=-1'], 'retrieve: error: argument --queries: -1 is out of range: give an integer '
                                        'between 0 and 1000000000'),
    (['retrieve', '0', '--n=1e12'], "retrieve: error: argument --n: '1e12' is not an integer"),
    (['retrieve', '0', '--mode', 'ngrams'], "retrieve: error: argument --mode: invalid choice: 'ngrams' (choose from "
                                            "'ngram', 'nbag'); did you mean 'ngram'?"),
    (['plot', '0', '--out', 'x', '--points=0'], 'plot: error: argument --points: 0 is out of range: give an integer '
                                                'between 1 and 1000000000'),
    (['decode', '0', '-n', '-3'], 'decode: error: argument -n: -3 is out of range: give an integer between 1 and '
                                  '1000000000'),
    (['info', '0', '--rows=nan'], "info: error: argument --rows: 'nan' is not an integer"),
    (['decod', '0'], "error: argument command: invalid choice: 'decod' (choose from 'decode', 'info', 'retrieve', "
                     "'quantize', 'plot'); did you mean 'decode'?"),
])
def test_analyze_numbers_and_choices(capsys, argv, says):
    assert argparse_error(capsys, A.main, argv).startswith('python -m store.analyze')
    assert argparse_error(capsys, A.main, argv).endswith(says)


def test_export_and_evaluate_choices(capsys):
    from runtime import evaluate as E
    assert argparse_error(capsys, E.main, ['0', '--tasks', 'memspec', '--memory', 'ablate']).endswith(
        "argument --memory: invalid choice: 'ablate' (choose from 'on', 'ablated', 'full_context'); did you mean "
        "'ablated'?")
    assert argparse_error(capsys, X.main, []).startswith('python -m store.export: error: the following arguments')


@pytest.mark.parametrize('temperature', [1e-300, 5e-324, 1e-9, 0.5, 1.0, 1e4])
def test_sampling_draws_at_any_accepted_temperature(temperature):
    logits = torch.randn(3, 50) * 30
    logits[1, 7] = 1e4  # a dominant token
    got = sample(logits, temperature, None, torch.Generator().manual_seed(0))
    assert got.shape == (3,) and ((got >= 0) & (got < 50)).all()
    if temperature <= 1e-9:
        assert torch.equal(got, logits.argmax(-1))  # the greedy limit
    with_k = sample(logits, temperature, 2, torch.Generator().manual_seed(0))
    assert all(int(t) in logits[i].topk(2).indices.tolist() for i, t in enumerate(with_k))


def test_retrieve_refuses_queries_longer_than_the_chunks(stored_run, capsys):
    code, out, err = in_process(A.main, ['retrieve', stored_run.run_id, '--store', stored_run.store, '--n',
                                         100000, '--queries', 10], capsys)
    assert code == 2 and out == '' and 'Traceback' not in err
    assert err.startswith('error: --n 100000: stage autoencode of run ') and err.endswith(
        'stores chunks of 8 tokens: a query cannot be longer than its chunk\n  fix: pass --n 1..8 (the paper: 7 of '
        '8)\n')


@pytest.fixture(scope='module')
def exported(stored_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('export') / 'model'
    X.main([stored_run.run_id, str(out), '--db', stored_run.url])
    return out


def test_generate_reads_an_export_as_its_run_folder(stored_run, exported, capsys):
    argv = ['--prompt', 'The', '--context', 'Names refer to objects. ' * 4, '--max-new-tokens', 6, '--json']
    code, from_folder, err = in_process(G.main, [stored_run.run_dir, *argv], capsys)
    assert code == 0, err
    code, from_export, err = in_process(G.main, [exported, *argv], capsys)
    assert code == 0, err
    assert json.loads(from_export)['tokens'] == json.loads(from_folder)['tokens']
    loaded = G.load_run(str(exported))  # the documented helper
    texts, out = G.complete(loaded, ['The'], 'Names refer to objects. ' * 4, max_new_tokens=6)
    assert out.tokens[0] == json.loads(from_export)['tokens'] and texts[0] == json.loads(from_export)['text']
    assert math.isfinite(out.ttft_s)


@pytest.mark.parametrize('argv, where, what', [
    (['--stage', 'copy'], '--stage copy', 'is an export: it holds the weights it was exported with'),
    (['--memories', 'copy:0'], '--memories copy:0', 'is an export: it has no memory store'),
])
def test_generate_from_an_export_refuses_what_it_lacks(exported, capsys, argv, where, what):
    code, out, err = in_process(G.main, [exported, '--prompt', 'x', *argv], capsys)
    assert code == 2 and out == '' and err.startswith(f'error: {where}: ') and what in err.splitlines()[0]
