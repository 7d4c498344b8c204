"""Offline analysis of stored memories (store/analyze.py) and the memory store itself (store/memories.py).

One tiny autoencoder run (runtime.run, in-process) feeds the decode / info / retrieve / plot tests; every number the
CLI prints is checked against a direct recomputation from the run's checkpoint. Synthetic stores (written with
store.memories.Writer) cover streaming, retrieval ground truth, torn groups, versions and bfloat16.
"""
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import in_process, no_run

from compiler import objectives as O
from compiler import plan as P
from compiler.model import build
from store import analyze as A
from store import memories as M
from store.analysis import figures, groups, reload, retrieve

ROOT = Path(__file__).resolve().parent.parent
PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Tiny models train far faster on one thread (and do not fight other processes for both cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def ae_run(tmp_path_factory):
    """A tiny autoencoder (byte-level vocabulary, 2 chunks x 4 tokens, d16) trained long enough to beat chance."""
    from runtime.run import main as run_main
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('ae')
    bindings = [f"Run.out_dir='{out}'", f"Data.cache_dir='{out / 'cache'}'", 'Data.vocab_size=260',
                'Data.max_documents=30', 'D_MODEL=16', 'N_LAYERS=1', 'N_HEADS=2', 'BATCH=16', 'CHUNKS=2', 'CHUNK_LEN=4',
                'autoencode/Stage.steps=80', 'autoencode/Stage.warmup=5', 'autoencode/Stage.lr=1e-2',
                'Stage.eval_every=40', 'Run.eval_batches=1', 'Run.log_every=20']
    argv = ['specs/autoencoder.gin'] + [x for b in bindings for x in ('-b', b)]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        run_main(argv)
    finally:
        os.chdir(cwd)
    store = out / 'memories.zarr'
    (entry,) = M.listing(store)
    assert entry['complete']
    return {'store': str(store), 'run_id': entry['run'], 'id': entry['run_id'], 'stage': entry['stage'], 'out': out,
            'db': f"sqlite:///{out / 'sacred.db'}"}


def cli(*argv, capsys):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    return in_process(A.main, argv, capsys)


def reference(ae_run):
    """The run's model, rebuilt independently of store.analyze's loader: plan from the Sacred config, weights
    from the stage checkpoint; and the stored group."""
    import sqlalchemy as sa
    from safetensors.torch import load_file
    g = M.open_group(ae_run['store'], ae_run['run_id'], ae_run['stage'])
    with sa.create_engine(ae_run['db']).connect() as c:
        cfg = json.loads(c.execute(sa.text('SELECT config FROM run WHERE run_id = :r'),
                                   {'r': ae_run['id']}).first()[0])
    plan = P.Plan.from_dict(cfg['plan'])
    model = build(plan, g.attrs['vocab_size'])
    model.load_state_dict(load_file(g.attrs['checkpoint_path']))
    return model.eval(), g


def synthetic(path, run_id='syn', stage='s', rows=600, chunks=2, chunk_len=4, dim=8, dtype='float32', seed=0,
              close=True, step=None):
    gen = torch.Generator().manual_seed(seed)
    mem = torch.randn(rows, chunks, dim, generator=gen)
    tok = torch.randint(4, 100, (rows, chunks, chunk_len), generator=gen)
    msk = torch.ones(rows, chunks, chunk_len, dtype=torch.bool)
    w = M.Writer(path, run_id, stage, {'chunks': chunks, 'chunk_len': chunk_len, 'memory_dim': dim, 'vocab_size': 100,
                                       'step': step or rows}, (rows, chunks, chunk_len, dim), dtype)
    for i in range(0, rows, 64 * M.ROWS):
        w.append(mem[i:i + 64 * M.ROWS], tok[i:i + 64 * M.ROWS], msk[i:i + 64 * M.ROWS])
    if close:
        w.close()
    return mem, tok, msk


# ------------------------------------------------------------------------------------------------ real run

def test_plan_rebuilt_from_run_folder_and_sacred_match_the_stored_hash(ae_run, tmp_path):
    g = M.open_group(ae_run['store'], ae_run['run_id'], ae_run['stage'])
    plan = reload.load_plan(g.attrs)
    assert plan.hash == g.attrs['spec_hash'] and plan.family == 'autoencoder'
    # no operative.gin where the run folder should be: the plan recorded in Sacred is used instead
    moved = {**g.attrs, 'checkpoint_path': str(tmp_path / 'gone' / 'stages' / 'x.safetensors')}
    assert reload.load_plan(moved, db=ae_run['db']).hash == g.attrs['spec_hash']


def test_decode_shows_original_and_decoded_text_with_per_sequence_accuracy(ae_run, capsys):
    code, out, _ = cli('decode', ae_run['run_id'], '--store', ae_run['store'], '-n', 4, capsys=capsys)
    assert code == 0
    model, g = reference(ae_run)
    _, tokens, mask = g.rows(0, 4)
    mask = mask.bool()
    with torch.no_grad():
        pred = model.autoencode(tokens, mask).argmax(-1)  # re-encodes the tokens: independent of the stored memories
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(g.attrs['tokenizer_path'])
    text = lambda ids: tok.decode(ids, skip_special_tokens=False).replace('\n', '\u23ce')  # noqa: E731
    shown = re.findall(r'seq\s+(\d+)\s+accuracy ([0-9.]+)\s+\((\d+)/(\d+) tokens\)', out)
    assert [int(s[0]) for s in shown] == [0, 1, 2, 3]
    for r, acc, correct, total in shown:
        r = int(r)
        hit = (pred[r] == tokens[r]) & mask[r]
        assert (int(correct), int(total)) == (int(hit.sum()), int(mask[r].sum()))
        assert 0.0 <= float(acc) <= 1.0 and float(acc) == pytest.approx(int(hit.sum()) / int(mask[r].sum()), abs=1e-4)
        original = ' | '.join(text(tokens[r, c][mask[r, c]].tolist()) for c in range(tokens.shape[1]))
        decoded = ' | '.join(text(pred[r, c][mask[r, c]].tolist()) for c in range(tokens.shape[1]))
        assert f'  original | {original}\n' in out and f'  decoded  | {decoded}\n' in out


def test_info_numbers_equal_a_direct_recomputation_with_tally(ae_run, capsys):
    code, out, _ = cli('info', ae_run['run_id'], '--store', ae_run['store'], '--csv', '-', capsys=capsys)
    assert code == 0
    (row,) = list(csv.DictReader(io.StringIO(out)))
    model, g = reference(ae_run)
    tally = O.Tally()
    for i in range(0, g.tokens.shape[0], 100):
        _, tokens, mask = g.rows(i, i + 100)
        with torch.no_grad():
            tally.add(model.autoencode(tokens, mask.bool()), torch.where(mask.bool(), tokens, O.IGNORE))
    (meta,) = [json.loads(p.read_text()) for p in (ae_run['out'] / 'cache').glob('data-*/meta.json')]
    assert g.attrs['bytes_per_token'] == meta['stats']['val']['bytes_per_token']  # recorded with the memories
    want = tally.metrics(g.attrs['vocab_size'], meta['stats']['val']['bytes_per_token'])
    assert int(row['tokens']) == tally.tokens == int(g.mask[:].sum())
    for k in ('token_accuracy', 'normalized_hamming', 'ce', 'info_proportion', 'bits_per_byte'):
        assert float(row[k]) == pytest.approx(want[k], rel=1e-4, abs=1e-6), k
    assert float(row['info_proportion']) == pytest.approx(1 - float(row['ce']) / math.log(g.attrs['vocab_size']))
    # it learned something: above the best guess that ignores the memory (always the most frequent token)
    real = g.tokens[:][g.mask[:]]
    assert float(row['token_accuracy']) > np.bincount(real).max() / len(real) > 10 / g.attrs['vocab_size']
    # the human-readable table carries the same numbers
    code, table, _ = cli('info', ae_run['run_id'], '--store', ae_run['store'], capsys=capsys)
    assert code == 0 and f"{want['token_accuracy']:.4f}" in table and 'I_e' in table and 'bits/byte' in table


def test_info_streams_the_store_in_slices(ae_run, capsys, monkeypatch):
    seen = []
    rows = M.Group.rows

    def spy(self, start, stop):
        seen.append((start, stop))
        return rows(self, start, stop)

    monkeypatch.setattr(M.Group, 'rows', spy)
    code, _, _ = cli('info', ae_run['run_id'], '--store', ae_run['store'], capsys=capsys)
    total = M.open_group(ae_run['store'], ae_run['run_id'], ae_run['stage']).tokens.shape[0]
    assert code == 0 and total > M.ROWS  # more than one slice to read
    assert all(b - a <= M.ROWS for a, b in seen) and sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == total


def test_retrieve_beats_chance_and_is_reproducible(ae_run, capsys):
    args = ('retrieve', ae_run['run_id'], '--store', ae_run['store'], '--n', 3, '--queries', 300)
    code, out, _ = cli(*args, '--seed', 7, capsys=capsys)
    assert code == 0
    code2, out2, _ = cli(*args, '--seed', 7, capsys=capsys)
    assert out2 == out
    line = [l for l in out.splitlines() if l.startswith(ae_run['run_id'] + ' ')][0].split()
    queries, candidates, top1, chance1, top5, chance5 = int(line[5]), int(line[6]), *map(float, line[7:11])
    assert queries == 300 and candidates == int(M.open_group(ae_run['store'], ae_run['run_id'],
                                                             ae_run['stage']).mask[:].any(-1).sum())
    assert chance1 == pytest.approx(1 / candidates, abs=1e-4) and chance5 == pytest.approx(5 / candidates, abs=1e-4)
    assert top1 >= chance1 and top5 >= top1 and top5 >= chance5
    code, nbag, _ = cli('retrieve', ae_run['run_id'], '--store', ae_run['store'], '--mode', 'nbag', '--n', 2,
                        '--queries', 100, capsys=capsys)
    assert code == 0 and ' nbag ' in nbag


def test_plot_writes_pngs(ae_run, capsys, tmp_path):
    import sqlalchemy as sa

    from store.database import METRICS
    db = f"sqlite:///{tmp_path / 'metrics.db'}"
    engine = sa.create_engine(db)
    METRICS.create(engine)
    with engine.begin() as c:
        c.execute(METRICS.insert(), [{'run_id': ae_run['id'], 'name': n, 'step': s, 'value': v}
                                     for s in (40, 80) for n, v in (('eval/autoencode.token_accuracy', s / 100),
                                                                    ('eval/autoencode.ce', 5 - s / 40),
                                                                    ('train/loss', 4.0))])
    code, out, err = cli('plot', ae_run['run_id'], '--store', ae_run['store'], '--out', tmp_path / 'fig', '--db', db,
                         '--points', 300, capsys=capsys)
    assert code == 0, err
    files = sorted(Path(p).name for p in out.split())
    run, stage = ae_run['run_id'], ae_run['stage']
    assert files == sorted([f'{run}_{stage}_pca.png', f'{run}_position_accuracy.png', f'{run}_metrics.png'])
    for f in files:
        assert (tmp_path / 'fig' / f).read_bytes()[:8] == PNG


def test_position_accuracy_matches_overall_accuracy(ae_run):
    g = M.open_group(ae_run['store'], ae_run['run_id'], ae_run['stage'])
    dec = reload.load_decoder(g)
    acc = figures.position_accuracy(dec, g)
    counts = g.mask[:].reshape(-1, g.mask.shape[-1]).sum(0)
    tally = O.Tally()
    for logits, labels in reload.iter_decoded(dec, g):
        tally.add(logits, labels)
    assert acc.shape == (g.tokens.shape[-1],) and np.all((acc >= 0) & (acc <= 1))
    assert float((acc * counts).sum() / counts.sum()) == pytest.approx(tally.correct / tally.tokens)


def test_readout_choice_is_checked_against_the_family(ae_run, capsys):
    code, _, err = cli('decode', ae_run['run_id'], '--store', ae_run['store'], '--readout', 'blank_copy', capsys=capsys)
    assert code == 2 and 'no memory slots' in err
    code, out, _ = cli('decode', ae_run['run_id'], '--store', ae_run['store'], '--readout', 'auto', '-n', 1,
                       capsys=capsys)
    assert code == 0 and 'model.decoder (autoencoder)' in out


def test_checkpoint_that_does_not_match_the_stored_widths(ae_run, tmp_path, capsys):
    g = M.open_group(ae_run['store'], ae_run['run_id'], ae_run['stage'])
    s, n, l = g.tokens.shape
    attrs = {k: v for k, v in g.attrs.items()
             if k not in ('format', 'version', 'rows', 'complete', 'dtype', 'storage_dtype')}
    w = M.Writer(tmp_path / 'bad.zarr', 'x', 'autoencode', {**attrs, 'memory_dim': 7}, (2, n, l, 7))
    w.append(torch.zeros(2, n, 7), torch.zeros(2, n, l, dtype=torch.long), torch.ones(2, n, l, dtype=torch.bool))
    w.close()
    code, _, err = cli('info', 'x', '--store', tmp_path / 'bad.zarr', capsys=capsys)
    assert code == 2 and 'does not match the stored widths' in err and 'Traceback' not in err


# ------------------------------------------------------------------------------------- synthetic stores, errors

def test_retrieval_with_queries_equal_to_stored_vectors_is_perfect(tmp_path):
    mem, _, _ = synthetic(tmp_path / 's.zarr', rows=700, chunks=3, dim=16)
    g = M.open_group(tmp_path / 's.zarr', 'syn', 's')
    r = retrieve.retrieval(g, lambda tokens, mask, memories, gen: memories, queries=0)
    assert r['top1'] == 1.0 and r['top5'] == 1.0 and r['queries'] == r['candidates'] == 2100
    assert r['chance1'] == pytest.approx(1 / 2100)
    # sampled queries, processed in several blocks: same answer
    r = retrieve.retrieval(g, lambda tokens, mask, memories, gen: memories, queries=500, block=128)
    assert r['top1'] == 1.0 and r['queries'] == 500
    # a query that is another chunk's vector is never right
    r = retrieve.retrieval(g, lambda tokens, mask, memories, gen: -memories, queries=200)
    assert r['top1'] == 0.0


def test_streaming_keeps_memory_bounded_on_a_large_store(tmp_path, monkeypatch):
    rows, dim = 100_000, 32
    mem, _, _ = synthetic(tmp_path / 'big.zarr', rows=rows, chunks=1, chunk_len=2, dim=dim)
    full_bytes = mem.numel() * 4
    g = M.open_group(tmp_path / 'big.zarr', 'syn', 's')
    seen = []
    read = M.Group.rows

    def spy(self, start, stop):
        seen.append(stop - start)
        return read(self, start, stop)

    monkeypatch.setattr(M.Group, 'rows', spy)
    tracemalloc.start()
    try:
        r = retrieve.retrieval(g, lambda tokens, mask, memories, gen: memories, queries=24)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r['top1'] == 1.0 and r['candidates'] == rows
    assert max(seen) <= M.ROWS and sum(seen) >= rows  # the whole store, slice by slice
    assert peak < full_bytes / 8, (peak, full_bytes)  # numpy buffers from zarr never hold the store (12.8 MB)


def test_killed_writer_is_reported_as_half_written(tmp_path, capsys):
    store = tmp_path / 'torn.zarr'
    w = M.Writer(store, 'k', 's', {}, (600, 2, 4, 8))
    w.append(torch.zeros(256, 2, 8), torch.zeros(256, 2, 4, dtype=torch.long), torch.ones(256, 2, 4, dtype=torch.bool))
    del w  # the writer dies here: no close(); what is on disk is what a killed process leaves
    assert M.listing(store) == [{'run': 'k', 'run_id': 'k', 'run_key': None, 'stage': 's', 'rows': 256,
                                 'complete': False, 'shape': [600, 2, 8]}]
    for extra in ((), ('--stage', 's')):
        code, out, err = cli('info', 'k', '--store', store, *extra, capsys=capsys)
        assert code == 2 and 'half-written' in err and '256 rows of 600' in err and 'Traceback' not in err
    # killed before the arrays existed (attrs only, or not even those)
    root = zarr.open_group(str(store), mode='a')
    root.require_group('k2/s').attrs.update({'format': M.FORMAT, 'version': M.FORMAT_VERSION, 'rows': 0,
                                             'complete': False})
    root.require_group('k3/s')
    for run in ('k2', 'k3'):
        code, _, err = cli('decode', run, '--store', store, capsys=capsys)
        assert code == 2 and 'half-written' in err
    # a complete stage beside a torn one: the torn one is skipped with a note
    synthetic(store, run_id='k', stage='t', rows=10)
    assert [s for s, _ in groups.stages(store, 'k')] == ['t']
    assert 'skipping' in capsys.readouterr().err


def test_incompatible_version_unknown_run_and_missing_store_exit_2(tmp_path, capsys):
    store = tmp_path / 's.zarr'
    synthetic(store, rows=10)
    zarr.open_group(str(store), mode='a')['syn/s'].attrs['version'] = M.FORMAT_VERSION + 1
    code, _, err = cli('info', 'syn', '--store', store, capsys=capsys)
    assert code == 2 and 'incompatible version' in err and 'Traceback' not in err
    code, _, err = cli('retrieve', 'nope', '--store', store, capsys=capsys)
    assert (code, err) == (2, f"error: {no_run('nope', f'the memory store {store}', ['syn'])}\n")
    code, _, err = cli('decode', 'syn', '--stage', 'zzz', '--store', store, capsys=capsys)
    assert code == 2 and "no stage 'zzz'" in err
    synthetic(store, run_id='nockpt', rows=10)
    code, _, err = cli('decode', 'nockpt', '--store', store, capsys=capsys)
    assert code == 2 and 'checkpoint_path' in err
    code, _, err = cli('plot', 'syn', '--out', tmp_path, '--store', tmp_path / 'missing.zarr', capsys=capsys)
    assert code == 2 and 'no memory store here' in err


def test_store_is_readable_with_plain_zarr(tmp_path):
    mem, tok, msk = synthetic(tmp_path / 'p.zarr', run_id='r', stage='st', rows=300, dim=6)
    code = ("import json, sys, zarr\n"
            f"root = zarr.open_group({str(tmp_path / 'p.zarr')!r}, mode='r')\n"
            "g = root['r']['st']\n"
            "print(json.dumps({'attrs': dict(g.attrs), 'mem': g['memories'][:3].tolist(), "
            "'tok': g['tokens'][:3].tolist(),\n"
            "                  'mask': g['mask'][:3].tolist(), 'shape': list(g['memories'].shape), "
            "'runs': sorted(root.group_keys()),\n"
            "                  'project': sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'store', 'compiler'))}))\n")
    p = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got['project'] == [] and got['runs'] == ['r'] and got['shape'] == [300, 2, 6]
    a = got['attrs']
    assert a['format'] == M.FORMAT and a['version'] == M.FORMAT_VERSION and a['complete'] is True and a['rows'] == 300
    assert np.array_equal(np.array(got['mem'], dtype=np.float32), mem[:3].numpy())
    assert (np.array_equal(np.array(got['tok']), tok[:3].numpy())
            and np.array_equal(np.array(got['mask']), msk[:3].numpy()))


def test_bfloat16_store_round_trip(tmp_path):
    mem, _, _ = synthetic(tmp_path / 'b.zarr', rows=300, dim=8, dtype='bfloat16')
    raw = zarr.open_group(str(tmp_path / 'b.zarr'), mode='r')['syn/s']
    assert (raw['memories'].dtype == np.uint16 and raw.attrs['dtype'] == 'bfloat16'
            and raw.attrs['storage_dtype'] == 'uint16')
    g = M.open_group(tmp_path / 'b.zarr', 'syn', 's')
    back, _, _ = g.rows(0, 300)
    want = mem.to(torch.bfloat16).float()
    assert back.dtype == torch.float32 and torch.equal(back, want) and not torch.equal(back, mem)
    # the uint16 bits are the bfloat16 bit pattern (readable without this project: shift into float32)
    bits = raw['memories'][:].astype(np.uint32) << 16
    assert np.array_equal(bits.view(np.float32), want.numpy())
    # analysis reads bf16 stores like float32 ones
    r = retrieve.retrieval(g, lambda tokens, mask, memories, gen: memories, queries=0)
    assert r['top1'] == 1.0


def test_blank_copy_readout_equals_the_models_own_blank_copy_pass():
    """Memory family without an ae_decoder: Graph.read_out of m_c = chunk 1 of the model's forward on [chunk, blanks,
    ...], and its labels make_example's blank-copy labels of that chunk."""
    from compiler.spec import load
    spec = load(['specs/memory_clm.gin'], ['D_MODEL=16', 'N_HEADS=2', 'N_LAYERS=1', 'CHUNK_LEN=5', 'CHUNKS=3'])
    torch.manual_seed(1)
    model = build(spec.plan, 50).eval()
    with torch.no_grad():
        model.memory.pad.normal_()
    tokens = torch.randint(4, 50, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        mem = model.encode(tokens, mask)
        logits, labels = model.read_out(mem, tokens, mask, O.SpecialIds(pad=0, blank=2, copy=3), 'blank_copy')
        blank = torch.where(mask, 2, 0)
        x = torch.stack([tokens, blank, blank], 1)
        m = torch.stack([mask, mask, mask], 1)
        want = model(x, m)[:, 1]
    assert torch.allclose(logits, want, atol=1e-5)
    assert torch.equal(labels, O.shifted_labels(tokens, mask))


def test_bad_arguments_exit_2(capsys):
    code, _, err = cli('retrieve', '0', '--n', 0, capsys=capsys)
    assert code == 2 and '--n' in err
    code, _, _ = cli('nonsense', capsys=capsys)
    assert code == 2
