"""One way to load a recorded run (compiler/load.py, store/runref.py) and one meaning of RUN in every command:
a run id, its full name <id>-<key> and its run folder's path are each accepted by runtime.generate,
runtime.evaluate, store.export, store.analyze and store.runs, and a RUN that matches nothing gets the same message
from all five. The loader serves every family of the registry; lm-eval scores runs without a KV cache (masked
mixer, recurrent, oracle); weights that are not the recorded ones are refused; store/ never runs a model."""
import ast
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, in_process
from safetensors.torch import save_file

from compiler import load as L
from compiler.errors import UserError
from compiler.families import NAMES, REGISTRY
from compiler.model import build
from compiler.spec import load as load_spec

FIX = ('  fix: give a run id (python -m store.runs list), its full name <id>-<key>, or the path of its run folder (a '
       'folder that holds operative.gin)')


# ----------------------------------------------------------------------------------------------- RUN, five commands

@pytest.fixture(scope='module')
def runs_copy(stored_run, tmp_path_factory):
    """The stored run's out_dir copied (run folder, memory store, database): commands that record (evaluate) write
    into the copy, not into the session's run."""
    out = tmp_path_factory.mktemp('runref') / 'runs'
    shutil.copytree(stored_run.out_dir, out, ignore=shutil.ignore_patterns('sacred.db*'))
    src, dst = sqlite3.connect(stored_run.db), sqlite3.connect(out / 'sacred.db')
    src.backup(dst)  # the database is in WAL mode: a file copy could miss the log
    src.close()
    dst.close()
    return out


def main_of(command):
    from runtime import evaluate, generate
    from store import analyze, export, runs
    return {'runtime.generate': generate.main, 'runtime.evaluate': evaluate.main, 'store.export': export.main,
            'store.analyze': analyze.main, 'store.runs': runs.main}[command]


def argv_of(command, ref, runs: Path, tmp: Path, located: bool) -> list:
    """The command's argv for RUN `ref`; `located`: RUN is a folder's path, so the database and the memory store
    beside it are the defaults (no --db, --store)."""
    db = [] if located else ['--db', f"sqlite:///{runs / 'sacred.db'}"]
    return {'runtime.generate': [ref, '--runs', runs, '--prompt', 'The', '--max-new-tokens', 2, '--json'],
            'runtime.evaluate': [ref, '--runs', runs, '--tasks', 'memspec_needle', '--limit', 1, '--json'],
            'store.export': [ref, tmp / f'export-{abs(hash(str(ref)))}', *db],
            'store.analyze': ['info', ref, '--rows', 2, '--stage', 'autoencode',
                              *([] if located else ['--store', runs / 'memories.zarr'])],
            'store.runs': ['show', ref, '--keys', *db]}[command]


COMMANDS = ['runtime.generate', 'runtime.evaluate', 'store.export', 'store.analyze', 'store.runs']


@pytest.mark.parametrize('command', COMMANDS)
def test_every_command_takes_a_run_id_its_full_name_and_its_folder(command, runs_copy, stored_run, tmp_path, capsys):
    """The three forms of RUN name the same run: each exits 0, and (where the output is deterministic) prints the
    same thing; the folder's path needs neither --db nor --store (the ones beside it)."""
    outs = []
    for ref, located in ((stored_run.run_id, False), (stored_run.name, False), (runs_copy / stored_run.name, True)):
        code, out, err = in_process(main_of(command), argv_of(command, ref, runs_copy, tmp_path, located), capsys)
        assert code == 0, f'{command} {ref}: {err}'
        outs.append(out)
    if command == 'runtime.generate':
        assert len({json.loads(o)['text'] for o in outs}) == 1
    if command in ('store.analyze', 'store.runs'):
        assert outs[0] == outs[1] == outs[2]


def test_a_run_that_matches_nothing_gets_one_message_from_every_command(runs_copy, stored_run, tmp_path, capsys):
    """Exit 2, one message: 'RUN <ref>: no run matches ...', where it looked and what it holds, and the same fix."""
    runs = str(runs_copy)
    looked = {'runtime.generate': f'the folder {runs}', 'runtime.evaluate': f'the folder {runs}',
              'store.export': f"sqlite:///{runs}/sacred.db", 'store.runs': f"sqlite:///{runs}/sacred.db",
              'store.analyze': f'the memory store {runs}/memories.zarr'}
    name, run_id = stored_run.name, stored_run.run_id
    held = {'runtime.generate': name, 'runtime.evaluate': name, 'store.export': run_id, 'store.runs': run_id,
            'store.analyze': name}
    for command in COMMANDS:
        code, out, err = in_process(main_of(command), argv_of(command, '98765', runs_copy, tmp_path, False), capsys)
        assert (code, out) == (2, ''), f'{command}: {err}'
        assert err == (f"error: RUN 98765: no run matches '98765': it is not a run folder, and {looked[command]} has "
                       f"no run with that id or name (known: {held[command]})\n{FIX}\n"), command


# ------------------------------------------------------------------------------------------- the loader, every family

SMALL = ['Data.vocab_size=300', 'D_MODEL=16', 'N_HEADS=2', 'N_LAYERS=1', 'CHUNKS=2', 'CHUNK_LEN=4']


def family_plan(name):
    kind = 'clm' if 'clm' in REGISTRY[name].objectives else 'autoencode'
    return load_spec(['specs/memory_combined.gin'], SMALL + [f"Plan.family = '{name}'",
                                                             'combined/Stage.objectives = [@o/Objective()]',
                                                             f"o/Objective.kind = '{kind}'"]).plan


@pytest.mark.parametrize('name', NAMES)
def test_the_loader_serves_every_family(name, tmp_path):
    """compiler.load.load rebuilds every family's graph with its weights; what the family can do with it is its
    record's answer: families that read tokens score text, families that store memories read them out."""
    plan = family_plan(name)
    want = build(plan, 300, seed=7).state_dict()
    save_file({k: v.contiguous() for k, v in want.items()}, tmp_path / 'w.safetensors')
    got = L.load(plan, tmp_path / 'w.safetensors', where='w', fix='f', vocab_size=300)
    state = got.model.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    fam = REGISTRY[name]
    tokens = torch.randint(4, 300, (3, 4))
    if fam.token_decoder:
        from runtime import scoring
        (scored,) = scoring.score(got.model, [tokens[0, :3].tolist()], [tokens[1].tolist()])
        assert len(scored.logprobs) == 4 and all(lp <= 0 for lp in scored.logprobs)
    if fam.stores_memories:
        mem = got.encode(tokens, None)
        logits, labels = got.read_out(mem, tokens, torch.ones_like(tokens, dtype=torch.bool), 0, 2,
                                      fam.readout(plan))
        assert logits.shape == (3, 4, 300) and labels.shape == (3, 4)


def test_weights_that_are_not_the_recorded_ones_are_refused(tmp_path, runs_copy, stored_run, capsys):
    plan = family_plan('memory')
    save_file(build(plan, 300).state_dict(), tmp_path / 'w.safetensors')
    with pytest.raises(UserError, match='is not the file that was recorded'):
        L.load(plan, tmp_path / 'w.safetensors', where='w', fix='f', vocab_size=300, sha256='0' * 64)
    # a run whose database recorded other bytes for its final weights: runtime.generate refuses, exit 2
    runs = tmp_path / 'runs'
    shutil.copytree(runs_copy, runs)
    con = sqlite3.connect(runs / 'sacred.db')
    (info,) = con.execute('SELECT info FROM run').fetchone()
    info = json.loads(info)
    info['weights']['final']['sha256'] = '0' * 64
    con.execute('UPDATE run SET info = ?', (json.dumps(info),))
    con.commit()
    con.close()
    code, out, err = in_process(main_of('runtime.generate'), [runs / stored_run.name, '--prompt', 'The'], capsys)
    assert (code, out) == (2, '') and 'final.safetensors is not the file that was recorded' in err
    assert 'Traceback' not in err


# ----------------------------------------------------------------------- lm-eval scoring of runs without a KV cache

@pytest.fixture(scope='module')
def cacheless_runs(tmp_path_factory, rt_cache):
    """Run folders made by hand (operative.gin, untrained weights, the data's tokenizer) of a masked-mixer memory
    model, the recurrent memory transformer and the oracle."""
    from runtime.data import prepare
    runs = tmp_path_factory.mktemp('cacheless') / 'runs'
    data = [f"Data.cache_dir = '{rt_cache}'", f"Run.out_dir = '{runs}'"]
    for name, files in (('mixer', ['specs/memory_clm.gin', 'specs/base/mixer.gin']),
                        ('recurrent', ['specs/recurrent.gin']), ('oracle', ['specs/oracle.gin'])):
        spec = load_spec(files, TINY + data)
        (runs / name).mkdir(parents=True)
        (runs / name / 'operative.gin').write_text(spec.operative)
        prepared = prepare(spec.plan, progress=False)
        save_file(build(spec.plan, prepared.vocab_size).state_dict(), runs / name / 'final.safetensors')
        shutil.copy(prepared.cache_path / 'tokenizer.json', runs / name)
    return runs


@pytest.mark.parametrize('name', ['mixer', 'recurrent', 'oracle'])
@torch.no_grad()
def test_lm_eval_scores_runs_without_a_kv_cache(name, cacheless_runs):
    """The memspec adapter loads them and scores loglikelihood requests: each log-likelihood equals log_softmax of
    the trained forward pass over context + continuation (1e-5); greedy generation works except for the oracle,
    refused with its registry record's reason."""
    from lm_eval.api.instance import Instance

    from runtime.lm_adapter import MemspecLM
    lm = MemspecLM(run=str(cacheless_runs / name), device='cpu', batch_size=2)
    plan, model = lm.plan, lm.model
    n, l = plan.memory.chunks, plan.memory.chunk_len
    pairs = [('The while statement', ' is used'), ('x', ' = 1')]
    got = lm.loglikelihood([Instance(request_type='loglikelihood', doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    for (ctx, cont), res in zip(pairs, got):
        c, k = lm._encode_pair(ctx, cont)
        row = c + k
        tokens, mask = torch.zeros(1, n * l, dtype=torch.long), torch.zeros(1, n * l, dtype=torch.bool)
        tokens[0, :len(row)], mask[0, :len(row)] = torch.tensor(row), True
        lp = torch.log_softmax(model(tokens.view(1, n, l), mask.view(1, n, l)).flatten(1, 2)[0], -1)
        want = lp[torch.arange(len(c) - 1, len(row) - 1), torch.tensor(k)].sum()
        torch.testing.assert_close(torch.tensor(res[0]), want, atol=1e-5, rtol=1e-5)
    request = Instance(request_type='generate_until', doc={}, arguments=('The', {'max_gen_toks': 3}), idx=0)
    if name == 'oracle':
        with pytest.raises(UserError, match="family 'oracle' cannot generate: the oracle's encoder reads"):
            lm.generate_until([request])
    else:
        assert isinstance(lm.generate_until([request])[0], str)


# ------------------------------------------------------------------------------------------- store never runs a model

MODEL_CALLS = {'forward', 'encode', 'memories', 'autoencode', 'read_out', 'regenerate', 'decode', 'encode_rows',
               'blank_copy_read_out', 'decoder_input', 'chunk_slots'}
TOKENIZERS = {'tok', 'tokenizer', 'self.tok'}


def test_store_never_runs_or_builds_a_model():
    """store/ asks the compiler's loaded-run API (compiler.load.Loaded.read_out / .encode) for logits and
    embeddings: no module of it imports the graphs (compiler.model) or torch.nn modules, calls a graph method
    (forward, encode, read_out, ...) on anything but a tokenizer or a compiler.load.Loaded, or calls a model."""
    found = []
    for path in sorted((ROOT / 'store').rglob('*.py')):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f'{path.relative_to(ROOT)}:{getattr(node, "lineno", 0)}'
            if isinstance(node, ast.ImportFrom) and node.module in ('compiler.model', 'torch.nn'):
                found.append(f'{where} imports {node.module}')
            if isinstance(node, ast.Import) and any(a.name in ('compiler.model', 'torch.nn') for a in node.names):
                found.append(f'{where} imports the graphs')
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in MODEL_CALLS:
                receiver = ast.unparse(f.value)
                if receiver not in TOKENIZERS and not receiver.endswith('loaded'):
                    found.append(f'{where} calls {receiver}.{f.attr}()')
            if isinstance(f, ast.Name) and f.id in ('build', 'meta_build', 'model'):
                found.append(f'{where} calls {f.id}()')
            if isinstance(f, ast.Attribute) and f.attr in ('model', 'decoder', 'encoder'):
                found.append(f'{where} calls {ast.unparse(f)}()')
    assert not found, '\n'.join(found)
