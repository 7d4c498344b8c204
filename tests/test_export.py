"""`python -m store.export RUN OUT` (store/export.py) and `compiler.load.from_pretrained`: the exported folder loads
without the run database, the run folder or the data cache into the run's own weights; the decoder loads as a Hugging
Face Llama with the same logits; the model card carries the run's stage-end metrics; bad input is one message, exit 2,
and no OUT is left half-written."""
import json
import shutil
import sqlite3

import pytest
import torch
from conftest import in_process, no_run
from safetensors.torch import load_file

from compiler.errors import UserError
from compiler.load import from_pretrained
from store import export as E
from store import runs as R
from store.database import display_url, get_run, open_db


def run_export(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    return in_process(E.main, argv, capsys)


@pytest.fixture(scope='module')
def exported(stored_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('export') / 'model'
    E.main([stored_run.run_id, str(out), '--db', stored_run.url])
    return out


def test_the_folder_holds_config_weights_tokenizer_spec_and_card(exported, stored_run):
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'hf', 'model.safetensors',
                                                          'operative.gin', 'tokenizer.json']
    cfg = json.loads((exported / 'config.json').read_text())
    assert cfg['format'] == 'memspec-export' and cfg['version'] == 1 and cfg['family'] == 'memory'
    assert (exported / 'model.safetensors').read_bytes() == (stored_run.run_dir / 'final.safetensors').read_bytes()
    assert (exported / 'tokenizer.json').read_bytes() == (stored_run.run_dir / 'tokenizer.json').read_bytes()
    assert (exported / 'operative.gin').read_text() == (stored_run.run_dir / 'operative.gin').read_text()
    assert cfg['run']['name'] == stored_run.name and cfg['provenance']['code']['kind'] == 'git'
    # the model card: the stage-end metrics as store.runs computes them from the database
    card = (exported / 'README.md').read_text()
    db = open_db(stored_run.url)
    sm = R.stage_end_metrics(db, get_run(db, stored_run.run_id))
    for stage in sm:
        assert f"{sm[stage]['blank_copy.token_accuracy']:.4f}" in card and stage in card
    assert 'from_pretrained' in card and 'LlamaForCausalLM' in card


def test_from_pretrained_needs_neither_database_nor_run_folder(exported, tmp_path):
    moved = tmp_path / 'elsewhere'
    shutil.copytree(exported, moved)  # nothing outside the folder is read
    model = from_pretrained(moved)
    want = load_file(moved / 'model.safetensors')
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not model.training and model.plan.family == 'memory'
    tokens = torch.randint(4, 300, (2, 4, 8))
    with torch.no_grad():
        assert torch.isfinite(model(tokens)).all()


def test_the_decoder_is_a_hugging_face_llama_with_our_logits(exported):
    import transformers
    model = from_pretrained(exported)
    hf = transformers.LlamaForCausalLM.from_pretrained(exported / 'hf').eval()
    tokens = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.decoder.head(model.decoder(tokens))
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(exported / 'hf')
    assert tok.decode(tok('The result of a call').input_ids) == 'The result of a call'


def test_stage_weights_export(stored_run, tmp_path, capsys):
    code, out, _ = run_export(capsys, stored_run.run_id, tmp_path / 'ae', '--db', stored_run.url, '--stage',
                              'autoencode')
    assert code == 0 and 'exported run' in out
    assert (tmp_path / 'ae' / 'model.safetensors').read_bytes() == \
        (stored_run.run_dir / 'stages' / 'autoencode.safetensors').read_bytes()
    assert json.loads((tmp_path / 'ae' / 'config.json').read_text())['weights']['stage'] == 'autoencode'


def test_bad_input_is_refused_and_leaves_no_folder(stored_run, tmp_path, capsys):
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'x').write_text('mine')
    code, _, err = run_export(capsys, stored_run.run_id, full, '--db', stored_run.url)
    assert code == 2 and 'already exists and is not an empty folder' in err and (full / 'x').read_text() == 'mine'
    code, _, err = run_export(capsys, '99', tmp_path / 'a', '--db', stored_run.url)
    known = [r.id for r in open_db(stored_run.url).runs()]
    assert (code, err) == (2, f"error: {no_run('99', display_url(stored_run.url), known)}\n")
    code, _, err = run_export(capsys, stored_run.run_id, tmp_path / 'b', '--db', stored_run.url, '--stage', 'nope')
    assert code == 2 and "no stage 'nope'" in err
    # weights that changed since the run recorded them (the record altered in a copy of the database)
    db = tmp_path / 'copy.db'
    with sqlite3.connect(stored_run.db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)  # the whole database, its write-ahead log included
    con = sqlite3.connect(db)
    (info,) = con.execute('SELECT info FROM run').fetchone()
    info = json.loads(info)
    info['weights']['final']['sha256'] = '0' * 64
    con.execute('UPDATE run SET info = ?', (json.dumps(info),))
    con.commit()
    con.close()
    code, _, err = run_export(capsys, stored_run.run_id, tmp_path / 'c', '--db', f'sqlite:///{db}')
    assert code == 2 and 'changed since the run recorded it' in err and 'Traceback' not in err
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith(('copy.db', 'full'))]  # nothing written


def test_from_pretrained_refuses_what_it_cannot_trust(exported, tmp_path):
    with pytest.raises(UserError, match='no config.json'):
        from_pretrained(tmp_path)
    bad = tmp_path / 'bad'
    shutil.copytree(exported, bad)
    (bad / 'model.safetensors').write_bytes((bad / 'model.safetensors').read_bytes()[:-4] + b'\0\0\0\0')
    with pytest.raises(UserError, match='is not the file that was recorded'):
        from_pretrained(bad)
    cfg = json.loads((bad / 'config.json').read_text())
    (bad / 'config.json').write_text(json.dumps({**cfg, 'version': 99}))
    with pytest.raises(UserError, match='not a memspec export of a version this code reads'):
        from_pretrained(bad)


def test_families_without_a_token_decoder_export_no_llama():
    from compiler.spec import load
    plan = load(['specs/autoencoder.gin'], ['Data.vocab_size=300']).plan
    assert 'reads memories, not tokens' in E.hf_export(None, plan, 300, {}, None, None)
    plan = load(['specs/mixer/clm.gin'], ['Data.vocab_size=300']).plan
    assert 'masked mixer' in E.hf_export(None, plan, 300, {}, None, None)


@pytest.mark.parametrize('case', ['vocab 1e11', 'vocab 10**11', 'vocab wrong', 'weights outside', 'plan garbled',
                                  'plan too large', 'weights name'])
def test_a_hostile_config_is_refused_before_anything_is_allocated(exported, tmp_path, case):
    """config.json is a file anyone can edit: a vocabulary that would allocate 10^11 rows, a weights name that leaves
    the folder, a plan that Plan.from_dict or the validator refuses, shapes that do not fit the weights' header: one
    UserError naming the place and the fix, and no model is built (the shapes are checked on the meta device)."""
    bad = tmp_path / 'bad'
    shutil.copytree(exported, bad)
    cfg = json.loads((bad / 'config.json').read_text())
    plan = cfg['plan']
    edit, message = {
        'vocab 1e11': ({'vocab_size': 1e11}, 'vocabulary size 100000000000.0 is not a number of tokens'),
        'vocab 10**11': ({'vocab_size': 10 ** 11}, 'vocabulary size 100000000000 is not a number of tokens'),
        'vocab wrong': ({'vocab_size': 299}, 'do not fit the \'memory\' graph of the plan (vocabulary 299): '
                        'ae_decoder.head.weight is [300, 32], the graph has [299, 32]'),
        'weights outside': ({'weights': {**cfg['weights'], 'file': '../../etc/passwd'}},
                            "the file name '../../etc/passwd' is not a plain file name"),
        'weights name': ({'weights': {**cfg['weights'], 'file': ['x']}}, "the file name ['x'] is not a plain file"),
        'plan garbled': ({'plan': {**plan, 'memory': 'x'}}, 'the recorded plan is not a plan this code reads'),
        'plan too large': ({'plan': {**plan, 'decoder': {**plan['decoder'], 'd_model': 2 ** 20, 'n_heads': 1}}},
                           'the recorded plan does not validate'),
    }[case]
    (bad / 'config.json').write_text(json.dumps({**cfg, **edit}))
    import compiler.model as graphs
    built = []
    real = graphs.build
    graphs.build = lambda *a, **k: built.append(a) or real(*a, **k)
    try:
        with pytest.raises(UserError, match='fix: export the run') as e:
            from_pretrained(bad)
    finally:
        graphs.build = real
    assert message in str(e.value), str(e.value)
    assert not built
