"""The paper's benchmark table runs through `python -m runtime.evaluate` with the harness' own task definitions: a
multiple-choice task (the harness' arc_easy.yaml, prompts and metrics unchanged) and a rolling-loglikelihood task (its
wikitext.yaml: loglikelihood_rolling, word/byte perplexity, bits per byte), each pointed at local files in that
dataset's format, so the route is tested offline. The answers are checked against the adapter's own scores."""
import json
import math
from pathlib import Path

import pytest
from conftest import in_process

lm_eval = pytest.importorskip('lm_eval', reason="lm-eval is not installed: pip install -e '.[test,eval]'")

from lm_eval.api.instance import Instance  # noqa: E402

import runtime.lm_adapter as A  # noqa: E402
from runtime import evaluate as E  # noqa: E402

HARNESS = Path(lm_eval.__file__).parent / 'tasks'
ARC = [  # the ARC dataset's fields (allenai/ai2_arc): id, question, choices {text, label}, answerKey
    {'id': f'q{i}', 'question': q, 'choices': {'text': c, 'label': ['A', 'B', 'C', 'D'][:len(c)]}, 'answerKey': a}
    for i, (q, c, a) in enumerate([
        ('Which gas do plants take in?', ['oxygen', 'carbon dioxide', 'helium', 'neon'], 'B'),
        ('What melts ice?', ['heat', 'cold', 'darkness'], 'A'),
        ('Which is a mammal?', ['shark', 'trout', 'whale', 'eel'], 'C'),
        ('What do bees make?', ['silk', 'honey'], 'B'),
        ('Where does the sun rise?', ['north', 'south', 'west', 'east'], 'D')])]
WIKI = [{'page': ' = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . \n'},
        {'page': ' = Valkyria = \n The game began development in 2010 , carrying over a large portion . \n'}]


def ask(lm, kind, args):
    return getattr(lm, kind)([Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)])


def local_tasks(folder: Path) -> Path:
    """The harness' arc_easy and wikitext task files, included whole, with their data from local files."""
    folder.mkdir()
    for name, rows in (('arc', ARC), ('wiki', WIKI)):
        (folder / f'{name}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (folder / 'arc_local.yaml').write_text(
        f"include: {HARNESS / 'arc' / 'arc_easy.yaml'}\ntask: arc_local\ntag: []\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    train: {folder / 'arc.jsonl'}\n"
        f"    validation: {folder / 'arc.jsonl'}\n    test: {folder / 'arc.jsonl'}\n")
    (folder / 'wikitext_local.yaml').write_text(
        f"include: {HARNESS / 'wikitext' / 'wikitext.yaml'}\ntask: wikitext_local\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    train: {folder / 'wiki.jsonl'}\n"
        f"    validation: {folder / 'wiki.jsonl'}\n    test: {folder / 'wiki.jsonl'}\n")
    return folder


def test_multiple_choice_and_rolling_tasks_run_from_local_files(flagship_run, tmp_path, capsys):
    tasks = local_tasks(tmp_path / 'tasks')
    code, out, err = in_process(E.main, [flagship_run.run_dir, '--tasks', 'arc_local,wikitext_local',
                                         '--include-path', tasks, '--json'], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report['documents'] == {'arc_local': len(ARC), 'wikitext_local': len(WIKI)}
    got = {(r['task'], r['metric']): r['value'] for r in report['results']}
    # multiple choice: the choice the adapter scores highest (summed log-likelihood after "Question: ...\nAnswer:")
    lm = A.MemspecLM(run=str(flagship_run.run_dir), device='cpu')
    right = 0
    for d in ARC:
        ctx = f"Question: {d['question']}\nAnswer:"
        scores = [r[0] for r in ask(lm, 'loglikelihood', [(ctx, ' ' + c) for c in d['choices']['text']])]
        right += max(range(len(scores)), key=scores.__getitem__) == d['choices']['label'].index(d['answerKey'])
    assert got[('arc_local', 'acc')] == pytest.approx(right / len(ARC))
    assert 0 <= got[('arc_local', 'acc_norm')] <= 1
    # rolling: bits per byte of the detokenized pages = -sum of their rolling log-likelihoods / bytes / ln 2
    import sys
    sys.path.insert(0, str(HARNESS / 'wikitext'))
    from preprocess_wikitext import wikitext_detokenizer
    ll = ask(lm, 'loglikelihood_rolling', [(wikitext_detokenizer(d),) for d in WIKI])
    nbytes = sum(len(d['page'].encode()) for d in WIKI)
    assert got[('wikitext_local', 'bits_per_byte')] == pytest.approx(-sum(ll) / nbytes / math.log(2), rel=1e-5)
