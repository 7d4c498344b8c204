"""What a run records beside its metrics (runtime/tracking.py, runtime/provenance.py, runtime/record.py): TensorBoard
event files read back with TensorBoard's own reader, learning rate / gradient norm / throughput metrics, the code, seed
and init_from sources a run came from, weights by reference, the tokenizer in the run folder, captured output, the
experiment's name, Sacred's import warning; and the memory store through xarray, with frozen-encoder stages sharing
one copy of their memories (store/memories.py)."""
import hashlib
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT, db_rows, rt_argv, rt_main, rt_run_dir, rt_run_ids

from compiler.digest import sha256_file
from compiler.spec import load
from runtime import provenance
from runtime.tracking import WALL_CLOCK
from store import memories as M

STAGE_ENDS = {'autoencode': 3, 'blank_copy': 6, 'copy': 8, 'combined': 10}  # TINY_FLAGSHIP


def record(stored_run) -> tuple[dict, dict]:
    ((config, info),) = db_rows(stored_run.db, 'SELECT config, info FROM run WHERE run_id = ?', stored_run.run_id)
    return json.loads(config), json.loads(info)


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'tensors': 0})
    acc.Reload()
    return acc


def assert_events_equal_database(folder, db, run_id):
    """Every scalar of the event files is a metric row of the database (float32, as TensorBoard keeps it)."""
    acc = events(folder)
    logged = db_rows(db, 'SELECT name, step, value FROM memspec_metrics WHERE run_id = ? ORDER BY name, step', run_id)
    want: dict[str, list] = {}
    for name, step, value in logged:
        want.setdefault(name, []).append((step, np.float32(value)))
    assert set(acc.Tags()['scalars']) == set(want)
    for name, points in want.items():
        got = [(e.step, np.float32(e.value)) for e in acc.Scalars(name)]
        assert got == points, name
    return acc


# ------------------------------------------------------------------------------------------------ tracking views

def test_tensorboard_event_files_hold_exactly_the_databases_metrics(stored_run):
    acc = assert_events_equal_database(stored_run.run_dir / 'tensorboard', stored_run.db, stored_run.run_id)
    # stage boundaries: one text marker at each stage's last step
    marks = acc.Tensors('stages/text_summary')
    assert [e.step for e in marks] == list(STAGE_ENDS.values())
    texts = [e.tensor_proto.string_val[0].decode() for e in marks]
    assert texts[1] == 'stage 2/4 `blank_copy` ended: steps 4-6', texts


def test_learning_rate_grad_norm_and_throughput_are_logged_at_every_log_step(stored_run):
    from runtime.train import optimizer
    plan = load(['specs/frozen_encoder_curriculum.gin'], stored_run.bindings).plan
    logged = {n: dict((s, v) for _, s, v in db_rows(stored_run.db, 'SELECT name, step, value FROM memspec_metrics '
                                                                 'WHERE run_id = ? AND name = ?', stored_run.run_id, n))
              for n in ('train/lr', 'train/grad_norm', 'train/tokens_per_s', 'train/loss')}
    assert set(logged['train/lr']) == set(logged['train/loss']) == set(range(1, 11))
    # the rate each update used: the stage's own schedule, replayed
    offset = 0
    for stage in plan.curriculum:
        opt, sched = optimizer([torch.nn.Parameter(torch.zeros(1))], stage)
        for step in range(1, stage.steps + 1):
            assert logged['train/lr'][offset + step] == opt.param_groups[0]['lr'], (stage.name, step)
            opt.step()
            sched.step()
        offset += stage.steps
    assert all(np.isfinite(v) and v > 0 for v in logged['train/grad_norm'].values())
    assert all(v > 0 for v in logged['train/tokens_per_s'].values()) and WALL_CLOCK == ('train/tokens_per_s',)


def test_captured_output_experiment_name_and_seed(stored_run):
    ((out, experiment),) = db_rows(stored_run.db, 'SELECT r.captured_out, e.name FROM run r JOIN experiment e '
                                               'ON e.experiment_id = r.experiment_id')
    config, _ = record(stored_run)
    assert experiment == 'frozen_encoder_curriculum' and config['plan']['run']['name'] == 'run'
    assert config['seed'] == config['plan']['run']['seed'] == 0  # Sacred's seed is Run.seed
    for stage in STAGE_ENDS:
        assert f'{stage}: evaluation' in out, out[-2000:]
    assert 'stage 1/4 autoencode: memories: 100%' in out  # the Zarr write shows progress
    assert '\r' not in out and '\x1b[' not in out  # tqdm's redraws collapsed, cursor movements removed


def test_sacred_imports_without_the_pkg_resources_warning_and_other_warnings_stay():
    code = ('import warnings\n'
            'import runtime.record\n'
            'leaked = [f for f in warnings.filters if f[1] is not None and "pkg_resources" in f[1].pattern]\n'
            'assert not leaked, leaked\n'
            'warnings.warn("still shown")\n')
    p = subprocess.run([sys.executable, '-W', 'default', '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert 'pkg_resources' not in p.stderr and 'still shown' in p.stderr


# ------------------------------------------------------------------------------------------------ provenance

def git(*args):
    return subprocess.run(['git', '-C', str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def test_code_and_seed_are_recorded_in_the_config_and_the_run_folder(stored_run):
    config, _ = record(stored_run)
    code = config['provenance']['code']
    assert code['kind'] == 'git' and code['commit'] == git('rev-parse', 'HEAD').strip()
    marker = json.loads((stored_run.run_dir / 'run.json').read_text())
    assert marker['provenance']['code']['commit'] == code['commit'] and 'diff' not in marker['provenance']['code']
    assert marker['provenance']['seed'] == config['provenance']['seed'] == 0
    diff = stored_run.run_dir / 'source.diff'
    if code['dirty'] and code['diff_bytes']:
        assert hashlib.sha256(diff.read_bytes()).hexdigest() == code['diff_sha256']
        assert db_rows(stored_run.db, "SELECT COUNT(*) FROM artifact WHERE filename = 'source.diff'") == [(1,)]
    else:
        assert not diff.exists()
    # Sacred's own source capture covers the whole project, not runtime/ alone
    sources = {r[0] for r in db_rows(stored_run.db, 'SELECT filename FROM source')}
    assert {'compiler/model.py', 'store/memories.py', 'runtime/trainer.py'} <= sources, sources


def test_the_diff_of_a_dirty_checkout_and_the_hash_of_a_plain_tree(tmp_path):
    repo = tmp_path / 'repo'
    for folder in provenance.TREE:
        shutil.copytree(ROOT / folder, repo / folder, ignore=shutil.ignore_patterns('__pycache__'))
    state, _ = provenance.source_state(repo)  # not a checkout of its own (its parents are no repository either)
    assert state['kind'] == 'tree' and state['sha256'] == provenance.tree_hash(repo)[0] and state['files'] > 50
    (repo / 'specs' / 'clm.gin').write_text((repo / 'specs' / 'clm.gin').read_text() + '\n# changed\n')
    assert provenance.source_state(repo)[0]['sha256'] != state['sha256']
    env = ['-c', 'user.email=t@t', '-c', 'user.name=t']
    subprocess.run(['git', 'init', '-q', str(repo)], check=True)
    subprocess.run(['git', '-C', str(repo), *env, 'add', '-A'], check=True)
    subprocess.run(['git', '-C', str(repo), *env, 'commit', '-qm', 'x'], check=True)
    clean, diff = provenance.source_state(repo)
    assert clean['kind'] == 'git' and not clean['dirty'] and diff == ''
    (repo / 'specs' / 'clm.gin').write_text('# edited\n')
    (repo / 'new.txt').write_text('new')
    dirty, diff = provenance.source_state(repo)
    assert dirty['commit'] == clean['commit'] and dirty['dirty'] and '+# edited' in diff
    assert dirty['diff_sha256'] == hashlib.sha256(diff.encode()).hexdigest() and dirty['diff'] == diff
    assert dirty['untracked'] == [{'path': 'new.txt', 'sha256': hashlib.sha256(b'new').hexdigest()}]


def test_init_from_sources_are_recorded_by_sha256(stored_run, tmp_path):
    import transformers
    plan = load(['specs/information_probe.gin'],
                ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2',
                 f"probe/Stage.init_from = {{'encoder': 'run:{stored_run.run_id}/autoencode'}}"]).plan
    got = provenance.init_sources(plan, stored_run.out_dir)
    (probe,) = got.values()
    src = stored_run.run_dir / 'stages' / 'autoencode.safetensors'
    assert probe['encoder']['source'] == f'run:{stored_run.run_id}/autoencode'
    assert probe['encoder']['files'] == [{'path': str(src.resolve()), 'bytes': src.stat().st_size,
                                          'sha256': sha256_file(src)}]
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   vocab_size=300, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / 'llama')
    plan = load(['specs/memory_clm.gin'], ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2',
                                           f"clm/Stage.init_from = {{'decoder': 'llama:{tmp_path / 'llama'}'}}"]).plan
    ((comp, ref),) = next(iter(provenance.init_sources(plan, tmp_path).values())).items()
    (f,) = ref['files']
    assert comp == 'decoder' and f['sha256'] == sha256_file(tmp_path / 'llama' / 'model.safetensors')


def test_weights_are_referenced_by_path_and_sha256_not_stored(stored_run):
    _, info = record(stored_run)
    final = stored_run.run_dir / 'final.safetensors'
    assert info['weights']['final'] == {'path': str(final.resolve()), 'bytes': final.stat().st_size,
                                        'sha256': sha256_file(final)}
    for stage in STAGE_ENDS:
        f = stored_run.run_dir / 'stages' / f'{stage}.safetensors'
        assert info['weights']['stages'][stage]['sha256'] == sha256_file(f)
    arts = {r[0] for r in db_rows(stored_run.db, 'SELECT filename FROM artifact')}
    assert 'final.safetensors' not in arts and {'operative.gin', 'summary.json', 'summary.md'} <= arts


def test_artifacts_blob_keeps_the_weights_in_the_database(tmp_path, rt_cache):
    out = tmp_path / 'runs'
    argv = rt_argv('specs/autoencoder.gin', out, rt_cache, ['Data.vocab_size=300', 'D_MODEL=16', 'N_HEADS=2',
                                                            'autoencode/Stage.steps=1', 'Run.eval_batches=1',
                                                            "Run.memory_store='none'"], ['--artifacts', 'blob'])
    assert rt_main(argv) == 0
    (run_id,) = rt_run_ids(out)
    final = rt_run_dir(out, run_id) / 'final.safetensors'
    ((blob,),) = db_rows(out / 'sacred.db', "SELECT content FROM artifact WHERE filename = 'final.safetensors'")
    assert bytes(blob) == final.read_bytes()


def test_the_tokenizer_travels_with_the_run_folder(stored_run, monkeypatch):
    from runtime import data
    from runtime import generate as G
    (cache,) = db_rows(stored_run.db, 'SELECT info FROM run')[0]
    cache = json.loads(cache)['data']['cache']
    assert (stored_run.run_dir / 'tokenizer.json').read_bytes() == (ROOT / cache / 'tokenizer.json').read_bytes()

    def no_cache(*args, **kwargs):
        raise AssertionError('the data cache was read')
    monkeypatch.setattr(data, 'prepare', no_cache)
    got = G.load_run(stored_run.run_dir)
    model, vocab = got.model, got.vocab
    assert vocab.vocab_size == model.decoder.head.out_features and vocab.special_ids['<eod>'] == vocab.eod_id
    assert vocab.tokenizer.decode(vocab.tokenizer.encode('The result').ids) == 'The result'
    g = M.open_group(stored_run.store, stored_run.name, 'autoencode')
    assert g.attrs['tokenizer_path'] == str((stored_run.run_dir / 'tokenizer.json').resolve())


# ------------------------------------------------------------------------------------------------ memory store

def test_the_store_opens_with_xarray_and_frozen_stages_share_one_copy(stored_run):
    import xarray as xr
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 'consolidated metadata missing' fallback, no stray-member warning
        tree = xr.open_datatree(stored_run.store, engine='zarr', consolidated=True)
        ds = xr.open_zarr(stored_run.store, group=f'{stored_run.name}/autoencode', consolidated=True)
    run = tree[stored_run.name]
    assert sorted(run.children) == sorted(STAGE_ENDS)
    assert dict(ds.sizes) == {'sequence': 507, 'chunk': 4, 'dim': 32, 'position': 8}
    assert ds['memories'].dims == ('sequence', 'chunk', 'dim')
    assert ds['tokens'].dims == ds['mask'].dims == ('sequence', 'chunk', 'position')
    assert ds['tokens'].dtype == np.int32 and ds['mask'].dtype == bool
    assert ds['memories'].attrs['long_name'] == 'memory embedding' and ds['tokens'].attrs['units'] == 'token id'
    assert ds.attrs['version'] == M.FORMAT_VERSION == 3 and ds.attrs['complete'] is True
    g = M.open_group(stored_run.store, stored_run.name, 'autoencode')
    mem, tok, msk = g.rows(0, 507)
    assert np.array_equal(ds['memories'].values, mem.numpy()) and np.array_equal(ds['tokens'].values, tok.numpy())
    # the encoder is frozen after autoencode: later stages reference its memories instead of copying them
    digests = set()
    for stage in ('blank_copy', 'copy', 'combined'):
        node = run[stage]
        assert node.attrs['memories_from'] == 'autoencode' and not node.dataset.data_vars
        assert not [p for p in (stored_run.store / stored_run.name / stage).iterdir() if p.is_dir()]  # no arrays
        shared = M.open_group(stored_run.store, stored_run.name, stage)
        assert shared.stored_in == 'autoencode' and shared.attrs['stage'] == stage
        assert shared.attrs['step'] == STAGE_ENDS[stage]
        assert torch.equal(shared.rows(0, 507)[0], mem)
        digests.add(shared.attrs['encoder_sha256'])
    assert digests == {g.attrs['encoder_sha256']}
    # and that digest is the frozen encoder's: recomputed from the last stage's weights
    from safetensors.torch import load_file
    state = load_file(stored_run.run_dir / 'stages' / 'combined.safetensors')
    from compiler.model import encoder_sha256
    assert encoder_sha256(state) == g.attrs['encoder_sha256']
    listed = {e['stage']: e for e in M.listing(stored_run.store)}
    assert listed['copy']['memories_from'] == 'autoencode' and listed['copy']['shape'] == [507, 4, 32]


def test_an_encoder_that_changed_writes_its_own_memories(tmp_path):
    from compiler.model import build, encoder_sha256
    plan = load(['specs/autoencoder.gin'], ['Data.vocab_size=300', 'D_MODEL=16', 'N_HEADS=2']).plan
    model = build(plan, 300)
    tokens = torch.randint(4, 300, (20, 4, 32))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    attrs = {'run_key': 'a' * 10, 'chunks': 4, 'chunk_len': 32, 'spec_hash': 'h'}
    encoded = []  # which stages' rows the graph was asked to encode

    def write(stage, previous=None):
        def rows():
            encoded.append(stage)
            yield from model.encode_rows(tokens, mask, 8)
        digest = encoder_sha256(model.state_dict())
        M.write(tmp_path / 's.zarr', '0-' + 'a' * 10, stage, rows(), (20, 4, 32, plan.decoder.d_model),
                {**attrs, 'encoder_sha256': digest}, previous=previous)
    write('one')
    write('two', previous='one')
    with torch.no_grad():
        model.encoder.norm.weight.add_(1.0)
    write('three', previous='two')
    assert encoded == ['one', 'three']  # a stage that shares the previous one's memories encodes nothing
    groups = {s: M.open_group(tmp_path / 's.zarr', '0-' + 'a' * 10, s) for s in ('one', 'two', 'three')}
    assert groups['two'].stored_in == 'one' and groups['three'].stored_in == 'three'
    assert not torch.equal(groups['three'].rows(0, 20)[0], groups['one'].rows(0, 20)[0])


def test_consolidated_metadata_follows_every_append(tmp_path):
    import zarr
    store = tmp_path / 'c.zarr'
    w = M.Writer(store, '0-' + 'a' * 10, 's', {'run_key': 'a' * 10}, (600, 2, 3, 4))
    w.append(torch.zeros(256, 2, 4), torch.zeros(256, 2, 3, dtype=torch.long), torch.ones(256, 2, 3, dtype=bool))
    meta = json.loads((store / 'zarr.json').read_text())['consolidated_metadata']['metadata']
    assert meta[f'0-{"a" * 10}/s']['attributes']['rows'] == 256
    assert meta[f'0-{"a" * 10}/s/memories']['dimension_names'] == ['sequence', 'chunk', 'dim']
    w.append(torch.zeros(344, 2, 4), torch.zeros(344, 2, 3, dtype=torch.long), torch.ones(344, 2, 3, dtype=bool))
    w.close()
    g = zarr.open_group(str(store), mode='r')[f'0-{"a" * 10}/s']  # plain zarr reads the consolidated copy
    assert g.attrs['rows'] == 600 and g.attrs['complete'] is True


def test_version_2_groups_are_still_read(tmp_path):
    """A group as format version 2 wrote it: no dimension names, no array attributes, no consolidated metadata."""
    import zarr
    from zarr.codecs import Crc32cCodec, ZstdCodec
    store = tmp_path / 'v2.zarr'
    g = zarr.open_group(str(store), mode='a').require_group('0-aaaaaaaaaa/s')
    mem = np.random.default_rng(0).standard_normal((300, 2, 4)).astype(np.float32)
    for name, a, fill in (('memories', mem, float('nan')), ('tokens', np.full((300, 2, 3), 5, np.int32), -1),
                          ('mask', np.ones((300, 2, 3), bool), False)):
        g.create_array(name, shape=a.shape, chunks=(M.ROWS, *a.shape[1:]), dtype=a.dtype, fill_value=fill,
                       compressors=[ZstdCodec(level=0), Crc32cCodec()], config={'write_empty_chunks': True})[:] = a
    g.attrs.update({'format': M.FORMAT, 'version': 2, 'run_id': '0', 'stage': 's', 'dtype': 'float32',
                    'rows': 300, 'complete': True})
    got, _, _ = M.open_group(store, '0-aaaaaaaaaa', 's').rows(0, 300)
    assert torch.equal(got, torch.from_numpy(mem))


def test_analysis_names_the_read_out_of_each_stage_and_finds_the_default_database(stored_run, tmp_path, capsys):
    from store import analyze as A
    capsys.readouterr()
    A.main(['info', stored_run.run_id, '--store', str(stored_run.store), '--rows', '20'])
    out = capsys.readouterr().out
    lines = {ln.split()[1]: ln.split() for ln in out.splitlines()[2:6]}
    assert lines['autoencode'][4] == 'ae_decoder'
    assert all(lines[s][4] == 'blank_copy' for s in ('blank_copy', 'copy', 'combined'))
    assert 'autoencode decoded through the ae_decoder it trains' in out
    assert 'blank_copy, copy, combined store no memories of their own' in out
    # plot without --db: the run's <out_dir>/sacred.db is found, the metric curves drawn
    A.main(['plot', stored_run.run_id, '--store', str(stored_run.store), '--out', str(tmp_path), '--rows', '8',
            '--points', '50', '--stage', 'combined'])
    written = capsys.readouterr().out.split()
    assert str(tmp_path / f'{stored_run.name}_metrics.png') in written
    assert (tmp_path / f'{stored_run.name}_metrics.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('name', ['loss', 'ce'])
def test_plot_panels_are_metric_kinds(name):
    from store.plots import kind, metric
    assert kind({'loss': 'train/clm.loss', 'ce': 'eval/clm.ce'}[name]) == name
    assert metric('eval/blank_copy_ablated.token_accuracy') == 'eval/blank_copy_ablated'
    assert kind('train/lr') == 'lr' and metric('train/lr') == 'train'


def test_a_resumed_writer_sorts_after_the_event_file_of_a_process_started_the_same_second(tmp_path):
    """TensorBoard reads a run's event files in name order (creation second first). A resume within the second of the
    killed process's file must still sort after it, or its purge would be applied before the events it drops."""
    import time

    from runtime.tracking import Tracker

    class Run:
        config = {}

        def log_scalar(self, *a):
            pass

    folder = tmp_path / 'tensorboard'
    folder.mkdir()
    now = int(time.time())
    killed = folder / f'events.out.tfevents.{now + 1}.host.99999.0'  # a pid that sorts after any real one
    killed.write_bytes(b'')
    tracker = Tracker(Run(), folder, resumed_at=4)
    tracker.close()
    names = sorted(p.name for p in folder.glob('events.out.tfevents.*'))
    assert names[0] == killed.name and len(names) == 2, names
