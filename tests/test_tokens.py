"""The token store (runtime/tokens.py) and its loader (runtime/examples.py): ranks, resume, damage, concurrency,
dtype, streaming, and equality with the in-memory pipeline it replaced."""
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

from compiler.plan import Data, Memory, Plan
from runtime import data as D
from runtime import documents
from runtime import tokens as T

ROOT = Path(__file__).resolve().parent.parent


def make_plan(tmp_path, chunks=2, chunk_len=8, **data):
    data.setdefault('cache_dir', str(tmp_path / 'cache'))
    return Plan(family='clm', data=Data(**data), memory=Memory(chunks=chunks, chunk_len=chunk_len))


def corpus(tmp_path, docs=300, seed=0, name='corpus.txt'):
    rng = random.Random(seed)
    words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()
    text = '\n\n'.join(' '.join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(docs))
    p = tmp_path / name
    p.write_text(text, encoding='utf-8')
    return str(p)


class Recording:
    """Examples that remember which rows each take() read."""

    def __init__(self, examples):
        self.examples, self.rows = examples, []

    def __len__(self):
        return len(self.examples)

    def take(self, rows):
        self.rows += list(map(int, rows))
        return self.examples.take(rows)


def sha(*tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- equality

# sha256 (first 16 hex) of train, train_mask, val, val_mask as the in-memory pipeline (runtime/data.py at main
# 1bf24c8: lists -> int64 arrays -> examples.pt) built them for the shipped specs on the embedded corpus.
OLD_PIPELINE = {
    ('specs/frozen_encoder_curriculum.gin', ()): 'b815b859e14d4a97',
    ('specs/frozen_encoder_curriculum.gin', ('Data.layout="padded"',)): 'f0ca5add2e2cfff4',
    ('specs/frozen_encoder_curriculum.gin', ('Data.full_length_only=True',)): 'a04ed45d47770d0f',
    ('specs/clm.gin', ()): '65779f188f6482e4',
    ('specs/clm.gin', ('Data.layout="padded"',)): '9c4faacb0c609115',
}


def test_the_embedded_default_gives_the_examples_of_the_in_memory_pipeline(tmp_path):
    from compiler.spec import load
    for (spec, bindings), want in OLD_PIPELINE.items():
        plan = load([str(ROOT / spec)], list(bindings) + [f"Data.cache_dir='{tmp_path}'"]).plan
        p = D.prepare(plan, progress=False)
        assert sha(p.train, p.train_mask, p.val, p.val_mask) == want, (spec, bindings)
    # one store serves every layout and chunking of the same data (one BPE training, not five)
    assert len(list(tmp_path.glob('data-*'))) == 1
    assert p.stats['train']['padding_fraction'] == 0.014593899250030518  # as recorded before (float32)


def test_txt_documents_stream_exactly_as_the_whole_file_split(tmp_path):
    """The line-by-line reader gives the documents re.split(r'\\n[ \\t]*\\n', whole text) gave, after stripping."""
    rng = random.Random(1)
    for _ in range(300):
        text = ''.join(rng.choice(['a', 'b', ' ', '\t', '\n', '\n', '\r\n', '\f']) for _ in range(rng.randint(0, 40)))
        whole = text.replace('\r\n', '\n')
        want = [t.strip() for t in re.split(r'\n[ \t]*\n', whole) if t.strip()]
        (tmp_path / 'doc.txt').write_bytes(text.encode())
        got = [t.strip() for t in documents._txt_documents(tmp_path / 'doc.txt', 'x') if t.strip()]
        assert got == want, repr(text)


def test_split_in_the_store_follows_split_documents_including_the_tiny_corpus_fallback(tmp_path):
    for docs, vf in ((['only one', 'only two'], 0.05), ([f'doc {i} text' for i in range(40)], 0.2),
                     (['first document', 'second document', 'third'], 0.0)):
        src = tmp_path / f'c{len(docs)}-{vf}.txt'
        src.write_text('\n\n'.join(docs))
        p = D.prepare(make_plan(tmp_path, chunks=1, chunk_len=1, source=str(src), vocab_size=260, val_fraction=vf,
                                layout='padded'), progress=False)
        train, val = documents.split_documents(docs, vf)
        for split, idx in (('train', train), ('val', val)):
            text = [p.tokenizer.decode(p.examples[split].tokens[a:b - 1].tolist())
                    for a, b in zip(p.examples[split].offsets[:-1], p.examples[split].offsets[1:])]
            assert text == [docs[i] for i in idx], (split, vf)
        assert not list(Path(p.cache_path).glob('*.spool*'))  # spools are build-time only


# ---------------------------------------------------------------------------------------------------- dtype

def test_dtype_is_the_smallest_that_holds_the_vocabulary(tmp_path):
    assert T.token_dtype(260) == np.uint16 and T.token_dtype(8192) == np.uint16
    assert T.token_dtype(65536) == np.uint16 and T.token_dtype(65537) == np.uint32
    src = corpus(tmp_path, 50)
    small = D.prepare(make_plan(tmp_path, source=src, vocab_size=300), progress=False)
    assert small.examples['train'].tokens.dtype == np.uint16
    assert (small.cache_path / 'train.tokens').stat().st_size == 2 * (small.stats['train']['tokens']
                                                                      + small.stats['train']['documents'])
    # a given tokenizer of 70,000 ids: uint32, and ids above 65535 survive the round trip
    tok = D.train_tokenizer(['alpha beta gamma'], 300)
    tok.add_tokens([AddedToken(f'w{i}x', normalized=False) for i in range(70000 - 300)] + ['zzzword'])
    big_id = tok.token_to_id('zzzword')
    assert big_id >= 65536
    tok.save(str(tmp_path / 'big.json'))
    big_src = tmp_path / 'big.txt'
    big_src.write_text('alpha zzzword beta\n\ngamma zzzword\n\n' * 10)
    big = D.prepare(make_plan(tmp_path, chunks=1, chunk_len=4, source=str(big_src),
                              tokenizer=str(tmp_path / 'big.json'), val_fraction=0.0), progress=False)
    assert big.examples['train'].tokens.dtype == np.uint32 and int((big.train == big_id).sum()) == 20


# ---------------------------------------------------------------------------------------------------- ranks + resume

@pytest.mark.parametrize('world', [2, 3])
def test_ranks_read_disjoint_rows_that_together_are_the_whole_split(tmp_path, world):
    p = D.prepare(make_plan(tmp_path, source=corpus(tmp_path), vocab_size=300), progress=False)
    ex = p.examples['train']
    batch = 6
    single = p.loader(batch, seed=5)
    ranks = [Recording(ex) for _ in range(world)]
    loaders = [D.Batches(ranks[r], batch, seed=5, rank=r, world=world) for r in range(world)]
    steps = -(-len(ex) // batch) + 2  # a little over one epoch
    for _ in range(steps):
        whole, parts = next(single), [next(b) for b in loaders]
        assert torch.equal(torch.cat([x for x, _ in parts]), whole[0])  # one process' batch, split in rank order
        assert torch.equal(torch.cat([m for _, m in parts]), whole[1])
    # rank r read only its own rows: disjoint per step, and the first epoch's draws are every example once
    per_step = [[r.rows[s * batch // world:(s + 1) * batch // world] for r in ranks] for s in range(steps)]
    stream = [i for step in per_step for part in step for i in part]
    for step in per_step:
        assert not set.intersection(*map(set, step))
    assert sorted(stream[:len(ex)]) == list(range(len(ex)))


def test_resume_from_a_saved_loader_state_continues_with_the_same_batches(tmp_path):
    src = corpus(tmp_path)
    p = D.prepare(make_plan(tmp_path, source=src, vocab_size=300), progress=False)
    a = [p.loader(4, seed=9, rank=r, world=2) for r in range(2)]
    for _ in range(len(p.examples['train']) // 4 + 3):  # past an epoch boundary
        [next(b) for b in a]
    state = json.loads(json.dumps(a[0].state_dict()))  # a checkpoint round trip
    assert state['epoch'] == 1 and state == a[1].state_dict()  # the position is global: every rank holds the same
    expected = [torch.cat([next(b)[0] for b in a]) for _ in range(5)]
    again = D.prepare(make_plan(tmp_path, source=src, vocab_size=300), progress=False)
    assert again.cache_hit
    one = again.loader(4, seed=9)  # resumed at world size 1
    one.load_state_dict(state)
    assert all(torch.equal(next(one)[0], want) for want in expected)
    with pytest.raises(D.UserError, match='num_examples'):
        D.prepare(make_plan(tmp_path, chunk_len=4, source=src, vocab_size=300),
                  progress=False).loader(4, seed=9).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------- damage

@pytest.mark.parametrize('damage', ['flip train.tokens', 'truncate train.offsets', 'garbage meta.json',
                                    'delete val.tokens', 'old version'])
def test_a_damaged_store_is_detected_and_rebuilt_with_one_note(tmp_path, damage, capsys):
    plan = make_plan(tmp_path, source=corpus(tmp_path), vocab_size=300)
    first = D.prepare(plan, progress=False)
    want = sha(first.train, first.val)
    how, name = damage.split(' ')
    target = first.cache_path / name
    if how == 'flip':  # same size, one byte changed in the middle: only the checksum sees it
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif how == 'truncate':
        os.truncate(target, target.stat().st_size - 8)
    elif how == 'garbage':
        target.write_bytes(b'\x00{not json')
    elif how == 'delete':
        target.unlink()
    else:
        meta = json.loads((first.cache_path / 'meta.json').read_text())
        meta['key']['version'] = 2
        (first.cache_path / 'meta.json').write_text(json.dumps(meta))
    del first
    capsys.readouterr()
    again = D.prepare(plan, progress=False)
    err = capsys.readouterr().err
    assert err.count('is damaged') == 1 and 'rebuilding it' in err, err
    assert (name if how != 'old' else 'cache version 2') in err
    assert not again.cache_hit and sha(again.train, again.val) == want
    assert D.prepare(plan, progress=False).cache_hit and 'damaged' not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- processes

def run_py(code, env=None, **kw):
    env = {**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


PREPARE = '''
import json, os, sys, time
from pathlib import Path
from compiler.plan import Data, Memory, Plan
from runtime import data as D, tokens as T
plan = Plan(family='clm', data=Data(source={src!r}, vocab_size=300, cache_dir={cache!r}),
            memory=Memory(chunks=2, chunk_len=8))
hold = os.environ.get('HOLD')
if hold:  # stop inside the build, under the lock, until the test says go
    real = T.building
    def building(entry):
        ctx = real(entry)
        Path(hold, 'inside').touch()
        while not Path(hold, 'go').exists():
            time.sleep(0.05)
        return ctx
    T.building = building
p = D.prepare(plan, progress=False)
print(json.dumps({{'hit': p.cache_hit, 'train': p.train.sum().item(), 'path': str(p.cache_path)}}))
'''


def waiting_for_lock(pid):
    """Whether process `pid` is blocked on a flock (Linux lists waiters in /proc/locks with '->')."""
    rows = [line.split() for line in Path('/proc/locks').read_text().splitlines()]
    return any('->' in row and str(pid) in row for row in rows)


def test_concurrent_preparers_build_once_and_the_other_waits(tmp_path):
    src, cache = corpus(tmp_path, 400), str(tmp_path / 'cache')
    hold = tmp_path / 'hold'
    hold.mkdir()
    code = PREPARE.format(src=src, cache=cache)
    first = run_py(code, {'HOLD': str(hold)})
    while not (hold / 'inside').exists():  # the first process holds the lock and is inside its build
        assert first.poll() is None, first.communicate()
    second = run_py(code)  # starts while the first builds: must wait for it, then reuse its entry
    while second.poll() is None and not waiting_for_lock(second.pid):  # (without a lock it builds too, and ends)
        time.sleep(0.05)
    (hold / 'go').touch()
    outs = [p.communicate(timeout=600) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    a, b = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert (a['hit'], b['hit']) == (False, True) and a['train'] == b['train'] and a['path'] == b['path']
    assert sorted(p.name for p in Path(cache).iterdir() if '.tmp' in p.name) == []


def test_a_full_disk_is_one_message_exit_2_and_no_temp_folder(tmp_path):
    """RLIMIT_FSIZE makes writes past 64 kB fail with EFBIG, as a full disk fails them with ENOSPC."""
    src, cache = corpus(tmp_path, 2000), tmp_path / 'cache'
    code = '''
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    from runtime.data import main
    main([{spec!r}, '-b', "Data.source = {src!r}", '-b', "Data.cache_dir = {cache!r}", '--quiet'])
    '''.format(spec=str(ROOT / 'specs/clm.gin'), src=src, cache=str(cache))
    p = run_py(code)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 2, err
    assert err.count('error:') == 1 and 'Traceback' not in err
    assert "Data.cache_dir = " in err and 'cannot write the data cache' in err and 'File too large' in err
    assert [q.name for q in cache.iterdir() if not q.name.startswith('.lock-')] == []


def test_a_read_only_cache_that_holds_the_entry_is_read(tmp_path, monkeypatch):
    """A pre-built store on a read-only mount: the lock file cannot be opened for writing (EROFS), the entry is
    still verified and used; building there is refused naming Data.cache_dir. (Simulated: the tests run as root,
    which permission bits do not stop.)"""
    import builtins
    src = corpus(tmp_path, 50)
    plan = make_plan(tmp_path, source=src, vocab_size=300)
    built = D.prepare(plan, progress=False)

    def read_only(path, mode='r', *args, **kwargs):
        if any(c in mode for c in 'wa+x') and str(path).startswith(str(tmp_path / 'cache')):
            raise OSError(30, 'Read-only file system')
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(T, 'open', read_only, raising=False)
    again = D.prepare(plan, progress=False)
    assert again.cache_hit and torch.equal(again.train, built.train)
    (built.cache_path / 'meta.json').write_bytes(b'garbage')  # damage it (pathlib writes through io.open, unpatched)
    with pytest.raises(D.UserError) as e:
        D.prepare(plan, progress=False)
    assert e.value.where.startswith('Data.cache_dir') and 'Read-only file system' in e.value.what
    assert [q.name for q in (tmp_path / 'cache').iterdir() if '.tmp' in q.name] == []


def test_parallel_workers_write_the_same_store_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(T, 'RANGE_BYTES', 4096)  # many ranges from a small corpus
    src = corpus(tmp_path, 600)
    one = D.prepare(make_plan(tmp_path, source=src, vocab_size=300, cache_dir=str(tmp_path / 'a')), progress=False,
                    workers=1)
    two = D.prepare(make_plan(tmp_path, source=src, vocab_size=300, cache_dir=str(tmp_path / 'b')), progress=False,
                    workers=2)
    assert one.stats['train']['bytes'] > 10 * T.RANGE_BYTES  # so the pool encoded many ranges, in order
    for f in D.CACHE_FILES:
        assert (one.cache_path / f).read_bytes() == (two.cache_path / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------------- report

def test_report_shows_tokens_consumed_per_stage_and_warns_past_one_epoch(tmp_path, capsys):
    D.main([str(ROOT / 'specs/frozen_encoder_curriculum.gin'), '-b', f"Data.cache_dir = '{tmp_path}'", '--quiet'])
    out = capsys.readouterr().out
    assert 'train tokens available: 151,840 in 4,745 examples' in out
    # autoencode: 800 steps x 32 examples x 4 x 8 tokens; epochs = 25,600 / 4,745 examples
    assert re.search(r'autoencode\s+800\s+819,200\s+5\.40', out)
    assert 'warning: the curriculum reads the train split 14.84 times (epochs > 1)' in out
    D.main([str(ROOT / 'specs/frozen_encoder_curriculum.gin'), '-b', f"Data.cache_dir = '{tmp_path}'",
            '-b', 'Run.steps_scale = 0.01', '--quiet'])
    assert 'warning' not in capsys.readouterr().out
    # a run prepares its data with progress on: the warning reaches its log too (stderr), once
    from compiler.spec import load
    plan = load([str(ROOT / 'specs/frozen_encoder_curriculum.gin')], [f"Data.cache_dir = '{tmp_path}'"]).plan
    D.prepare(plan, progress=True)
    assert capsys.readouterr().err.count('warning: the curriculum reads the train split 14.84 times') == 1


def test_statistics_read_a_bounded_evenly_spaced_sample_of_a_large_split(tmp_path):
    """Run statistics (the floors) never hold a large split in memory: a split within the bound is read whole (the
    floors of the embedded default are exact), a larger one through evenly spaced rows, the same ones every time."""
    p = D.prepare(make_plan(tmp_path, source=corpus(tmp_path), vocab_size=300), progress=False)
    e, n, l = p.examples['train'].shape
    whole = p.sample('train', e * n * l)
    assert torch.equal(whole[0], p.train) and torch.equal(whole[1], p.train_mask)
    budget = 5 * n * l + 3  # room for 5 examples
    x, m = p.sample('train', budget)
    assert x.shape == (5, n, l) and x.numel() <= budget
    rows = np.linspace(0, e - 1, 5).round().astype(np.int64)
    assert torch.equal(x, p.train[rows]) and torch.equal(m, p.train_mask[rows])
    assert torch.equal(p.sample('train', budget)[0], x)
