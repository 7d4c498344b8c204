"""Evaluation through lm-evaluation-harness (runtime/lm_adapter.py, runtime/evaluate.py, specs/eval): the adapter
answers the harness' own request types (lm_eval.api.instance.Instance) exactly as the model's forward pass scores
the same tokens, batched equals one by one, the shipped offline tasks run end to end through
lm_eval.simple_evaluate, the needle's answer is reachable only through memories, and `python -m runtime.evaluate`
records, prints and refuses bad input with one message. Needs the `eval` extra (lm-eval); the test command installs
it."""
import json
import re
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, in_process, no_run, rt_env

lm_eval = pytest.importorskip('lm_eval', reason="lm-eval is not installed: pip install -e '.[test,eval]'")
from lm_eval.api.instance import Instance  # noqa: E402

import runtime.lm_adapter as A  # noqa: E402
from runtime import evaluate as E  # noqa: E402
from runtime import scoring as S  # noqa: E402

sys.path.insert(0, str(ROOT / 'specs' / 'eval'))
import memspec_tasks as T  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope='module')
def lm(flagship_run):
    return A.MemspecLM(run=str(flagship_run.run_dir), device='cpu', batch_size=4)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [('The while statement', ' is used'), ('x', ' = 1'), ('Customizing attribute', ' access'),
         ('Names refer to objects.', ' Names are')]  # at most 32 tokens with the tests' 300-token vocabulary


@torch.no_grad()
def test_loglikelihood_equals_the_forward_pass(lm):
    """Each (context, continuation) of real text: the adapter's log-likelihood and is_greedy equal log_softmax of
    model(tokens) over the same tokens at the positions before each continuation token (1e-5), the per-token flags
    the argmax, across chunk boundaries (contexts of 2..14 tokens, continuations up to a chunk and more)."""
    got = lm.loglikelihood(requests('loglikelihood', PAIRS))
    plan, model = lm.plan, lm.model
    n, l = plan.memory.chunks, plan.memory.chunk_len
    for (ctx, cont), res in zip(PAIRS, got):
        c, k = lm._encode_pair(ctx, cont)
        assert len(c) + len(k) <= n * l and k
        seq = torch.zeros(1, n * l, dtype=torch.long)
        seq[0, :len(c) + len(k)] = torch.tensor(c + k)
        lp = torch.log_softmax(model(seq.view(1, n, l)).flatten(1, 2)[0], -1)
        pos = torch.arange(len(c) - 1, len(c) + len(k) - 1)
        want = lp[pos, torch.tensor(k)]
        torch.testing.assert_close(torch.tensor(res[0]), want.sum(), **TOL)
        assert res.greedy == (lp[pos].argmax(-1) == torch.tensor(k)).tolist()
        assert res[1] == all(res.greedy)


def test_batched_requests_equal_one_by_one(lm):
    """loglikelihood, loglikelihood_rolling and generate_until over a ragged batch give what each request gets alone."""
    together = lm.loglikelihood(requests('loglikelihood', PAIRS))
    alone = [lm.loglikelihood(requests('loglikelihood', [p]))[0] for p in PAIRS]
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(b[0]), **TOL)
        assert a.greedy == b.greedy
    docs = [(ctx + cont,) for ctx, cont in PAIRS]
    rolled = lm.loglikelihood_rolling(requests('loglikelihood_rolling', docs))
    for (doc,), r in zip(docs, rolled):
        ids = lm.tok_encode(doc)
        whole = S.score(lm.model, [[lm.eot_token_id]], [ids])[0].logprob  # the document after one <eod>
        torch.testing.assert_close(torch.tensor(r), torch.tensor(whole), **TOL)
    gen = [(ctx, {'until': ['\n\n'], 'max_gen_toks': 12}) for ctx, _ in PAIRS]
    assert lm.generate_until(requests('generate_until', gen)) == \
        [lm.generate_until(requests('generate_until', [g]))[0] for g in gen]


def test_simple_evaluate_runs_a_shipped_task_end_to_end(flagship_run):
    """lm_eval.simple_evaluate(model='memspec', model_args='run=...') on the shipped tasks (specs/eval): every task of
    the memspec group reports its metrics."""
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_path=str(ROOT / 'specs' / 'eval'), include_defaults=False,
                        metadata={'run': str(flagship_run.run_dir)})
    res = lm_eval.simple_evaluate(model='memspec', model_args=f'run={flagship_run.run_dir},batch_size=8',
                                  tasks=['memspec'], limit=4, bootstrap_iters=0, device='cpu', task_manager=tasks)
    r = res['results']
    assert 0 <= r['memspec_needle']['acc,none'] <= 1
    assert 0 <= r['memspec_cloze']['acc,none'] <= 1 and r['memspec_cloze']['perplexity,none'] > 1
    clm = r['memspec_clm_hamming']
    assert clm['hamming,none'] == pytest.approx(1 - clm['token_accuracy,none'])
    assert 0 <= r['memspec_copy_hamming']['token_accuracy,none'] <= 1
    assert {'exact_match,none', 'token_accuracy,none', 'bleu,none'} <= set(r['memspec_reconstruct'])


def test_needle_answer_sits_in_an_earlier_chunk(lm, flagship_run):
    """The needle documents: chunk 0 holds the key, the question starts chunk N/2 exactly (the run's own tokens);
    with memories ablated the choices' scores do not depend on the key at all (chance), with memories on they do."""
    docs = T.needle_docs(run=str(flagship_run.run_dir))
    assert len(docs) >= 20
    l, d = lm.plan.memory.chunk_len, lm.plan.memory.chunks // 2
    doc = docs[0]
    ctx = lm.tok_encode(doc['context'])
    head = len(ctx) - d * l  # the question: the needle chunk's first tokens again, at the start of chunk d
    assert 0 < head < l and ctx[:head] == ctx[d * l:]
    assert ctx[head:l] == lm.tok_encode(doc['choices'][doc['gold']])  # the key fills the rest of chunk 0
    other = docs[1]['choices'][docs[1]['gold']]
    swapped = doc['context'].replace(doc['choices'][doc['gold']], other, 1)
    assert swapped != doc['context'] and len(lm.tok_encode(swapped)) == len(ctx)

    def scores(context, memory):
        m = A.MemspecLM(run=str(flagship_run.run_dir), device='cpu', memory=memory)
        return [r[0] for r in m.loglikelihood(requests('loglikelihood', [(context, c) for c in doc['choices']]))]
    assert scores(doc['context'], 'ablated') == scores(swapped, 'ablated')
    assert scores(doc['context'], 'on') != scores(swapped, 'on')


# ------------------------------------------------------------------------------------------------ CLI

def cli(argv, capsys):
    return in_process(E.main, argv, capsys)


def test_evaluate_records_prints_and_writes_json(flagship_run, capsys):
    """A real evaluation: the table, the JSON report, its rows in memspec_evaluations tied to run and stage, and
    store.runs show/compare listing them."""
    from store import runs as R
    run = flagship_run.run_dir
    code, out, err = cli([run, '--stage', 'copy', '--tasks', 'memspec_needle', '--limit', 3, '--memory', 'ablated',
                          '--json'], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report['stage'] == 'copy' and report['memory'] == 'ablated' and report['limit'] == 3
    assert report['documents'] == {'memspec_needle': 3}
    acc = [r['value'] for r in report['results'] if r['metric'] == 'acc']
    assert len(acc) == 1 and json.loads((run / 'evaluations' / 'copy.ablated.json').read_text()) == report
    con = sqlite3.connect(flagship_run.db)
    try:
        rows = con.execute('SELECT run_id, stage, task, metric, value, memory, "limit" '
                           'FROM memspec_evaluations').fetchall()
    finally:
        con.close()
    assert (flagship_run.run_id, 'copy', 'memspec_needle', 'acc', acc[0], 'ablated', 3) in rows
    code, out, err = cli([run, '--tasks', 'memspec_needle', '--limit', 3], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == f'run {flagship_run.run_id} (memory), stage final, memory on, limit 3'
    assert re.search(r'memspec_needle +3  acc ', out)
    R.main(['show', flagship_run.run_id, '--db', f'sqlite:///{flagship_run.db}'])
    shown = capsys.readouterr().out
    assert 'evaluations (python -m runtime.evaluate; the newest of each)' in shown
    assert 'copy   ablated      3  memspec_needle  acc' in shown
    R.main(['compare', flagship_run.run_id, flagship_run.run_id, '--db', f'sqlite:///{flagship_run.db}'])
    compared = capsys.readouterr().out
    assert re.search(r'memspec_needle +acc +copy/ablated/limit 3 +([0-9.]+) +\1', compared)


def test_harness_entry_hands_every_flag_to_the_harness_cli(flagship_run, tmp_path):
    """python -m runtime.harness: the harness' own CLI (its flags: --model_args, --include_path, --limit,
    --output_path, ...) with the memspec model registered."""
    p = subprocess.run([sys.executable, '-m', 'runtime.harness', '--model', 'memspec', '--model_args',
                        f'run={flagship_run.run_dir},memory=ablated', '--batch_size', '8',
                        '--include_path', 'specs/eval', '--tasks', 'memspec_needle', '--limit', '3', '--device', 'cpu',
                        '--output_path', str(tmp_path / 'out')],
                       cwd=ROOT, env=rt_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r'\|memspec_needle\|1\|none\|0\|acc\|', p.stdout.replace(' ', '')), p.stdout
    written = list((tmp_path / 'out').rglob('results_*.json'))
    assert len(written) == 1 and 'memspec_needle' in json.loads(written[0].read_text())['results']


def refusals(run):
    runs = run.parent
    return {
        'unknown task': ([run, '--tasks', 'memspec_nope'],
                         '--tasks memspec_nope: unknown task memspec_nope\n  fix: name harness tasks or groups, e.g. '
                         'memspec, memspec_clm_hamming, memspec_cloze, memspec_copy_hamming, memspec_needle, '
                         'memspec_reconstruct (list them all: python -m runtime.harness ls tasks '
                         '--include_path specs/eval)'),
        'unknown stage': ([run, '--stage', 'nope', '--tasks', 'memspec_needle'],
                          f"--stage nope: run {run} has no stage 'nope' (stages: autoencode, blank_copy, copy, "
                          'combined)\n  fix: pick one of the listed stages, or leave --stage out for the final '
                          'weights'),
        'unknown run': (['nope', '--runs', runs, '--tasks', 'memspec'],  # other tests may add runs to this folder
                        no_run('nope', f'the folder {runs}', sorted((p.name for p in runs.iterdir()
                                                                      if re.fullmatch(r'\d+-[0-9a-f]+', p.name)),
                                                                     key=lambda n: int(n.split('-')[0])))),
    }


@pytest.mark.parametrize('case', ['unknown task', 'unknown stage', 'unknown run'])
def test_evaluate_refuses_bad_input_with_one_message(flagship_run, capsys, case):
    argv, message = refusals(flagship_run.run_dir)[case]
    assert cli(argv, capsys) == (2, '', f'error: {message}\n')


def test_evaluate_refuses_a_run_its_database_does_not_hold(flagship_run, tmp_path):
    """A run folder copied elsewhere has no record beside it: refused as a subprocess, exit 2, no traceback, nothing
    written."""
    import shutil
    copy = tmp_path / 'runs' / flagship_run.run_dir.name
    shutil.copytree(flagship_run.run_dir, copy, ignore=shutil.ignore_patterns('checkpoint.pt*', 'evaluations'))
    src, con = sqlite3.connect(flagship_run.db), sqlite3.connect(tmp_path / 'runs' / 'sacred.db')
    src.backup(con)  # the database is in WAL mode: a file copy could miss the log
    con.execute('DELETE FROM run')
    con.commit()
    src.close()
    con.close()
    p = subprocess.run([sys.executable, '-m', 'runtime.evaluate', str(copy), '--tasks', 'memspec'], cwd=ROOT,
                       env=rt_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stdout == '' and 'Traceback' not in p.stderr
    assert p.stderr.startswith(f'error: run {flagship_run.run_id}: no run with this id in sqlite:///')
    assert not (copy / 'evaluations').exists()
