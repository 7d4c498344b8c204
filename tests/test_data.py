"""Data pipeline: split, tokenizer, layouts, cache, batches, errors (runtime/data.py)."""
import json
import random

import pytest
import torch

from compiler.errors import UserError
from compiler.plan import Data, Memory, Plan
from runtime import data as D


def make_plan(tmp_path, chunks=2, chunk_len=3, **data):
    data.setdefault('cache_dir', str(tmp_path / 'cache'))
    return Plan(family='clm', data=Data(**data), memory=Memory(chunks=chunks, chunk_len=chunk_len))


def write(tmp_path, text, name='corpus.txt'):
    p = tmp_path / name
    p.write_text(text, encoding='utf-8')
    return str(p)


def tokens(prep, x):
    """Token strings of an id tensor, nested like the tensor."""
    return [tokens(prep, r) for r in x] if x.dim() else prep.tokenizer.id_to_token(int(x))


# A 260-entry vocabulary is the 256 bytes + 4 specials and no merges, so every character is one token and the
# golden layouts below can be written out by hand.
BYTES_ONLY = 256 + len(D.SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------------- split

def test_split_is_deterministic_and_independent_of_document_order():
    docs = D.embedded_documents()
    train, val = D.split_documents(docs, 0.1)
    assert (train, val) == D.split_documents(docs, 0.1)
    assert val and train and sorted(train + val) == list(range(len(docs)))
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = D.split_documents(shuffled, 0.1)
    assert {shuffled[i] for i in val2} == {docs[i] for i in val}
    # a document's split does not depend on the other documents either
    sub = docs[::3]
    _, val3 = D.split_documents(sub, 0.1)
    assert {sub[i] for i in val3} == {docs[i] for i in val if i % 3 == 0}


def test_split_fraction_and_tiny_corpora():
    docs = [f'document number {i}' for i in range(4000)]
    _, val = D.split_documents(docs, 0.05)
    assert 0.04 < len(val) / len(docs) < 0.06
    # two documents: each split gets one, whatever the hash draws
    tr, va = D.split_documents(['one', 'two'], 0.05)
    assert len(tr) == 1 and len(va) == 1
    assert D.split_documents(['one', 'two'], 0.0) == ([0, 1], [])


# ---------------------------------------------------------------------------------------------------- embedded + cache

def test_embedded_corpus_prepares_with_sane_stats(tmp_path):
    prep = D.prepare(make_plan(tmp_path, chunks=4, chunk_len=32, vocab_size=512), progress=False)
    n, l = 4, 32
    assert prep.train.dtype == torch.int64 and prep.train.shape[1:] == (n, l) and prep.val.shape[1:] == (n, l)
    assert prep.train_mask.dtype == torch.bool and prep.train_mask.shape == prep.train.shape
    assert prep.vocab_size == 512 and int(prep.train.max()) < 512
    s = prep.stats
    assert s['train']['documents'] > 150 and s['val']['documents'] > 3
    assert 0.03 < s['val']['bytes'] / (s['train']['bytes'] + s['val']['bytes']) < 0.08
    # packed: one example per N*L tokens of text + one <eod> per document
    assert s['train']['examples'] == (s['train']['tokens'] + s['train']['documents']) // (n * l)
    assert s['train']['padding_fraction'] == 0.0
    for split in ('train', 'val'):
        assert 1.5 < prep.bytes_per_token[split] < 6
    # eod count in the train examples equals the number of documents fully inside them
    assert int((prep.train == prep.eod_id).sum()) in range(s['train']['documents'] - 1, s['train']['documents'] + 1)


def test_cache_hit_miss_and_rebuild_on_change(tmp_path):
    src = write(tmp_path, 'alpha beta gamma delta\n\nepsilon zeta eta theta\n\n' * 20)
    plan = make_plan(tmp_path, source=src, vocab_size=300, val_fraction=0.0)
    first = D.prepare(plan, progress=False)
    assert not first.cache_hit
    assert (first.cache_path / 'tokenizer.json').is_file()
    second = D.prepare(plan, progress=False)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert torch.equal(first.train, second.train) and first.tokenizer.to_str() == second.tokenizer.to_str()
    # any key change rebuilds into a new entry
    other = D.prepare(make_plan(tmp_path, source=src, vocab_size=270, val_fraction=0.0), progress=False)
    assert not other.cache_hit and other.cache_path != first.cache_path and other.vocab_size == 270
    # the layout, N and L are not: examples are cut from the same token store on the fly
    relaid = D.prepare(make_plan(tmp_path, chunks=3, chunk_len=2, source=src, vocab_size=300, val_fraction=0.0,
                                 layout='padded'), progress=False)
    assert relaid.cache_hit and relaid.cache_path == first.cache_path and relaid.train.shape[1:] == (3, 2)
    # the seed is not part of the key: nothing cached depends on it
    assert D.cache_key(plan.data) == D.cache_key(make_plan(tmp_path, source=src, vocab_size=300,
                                                           val_fraction=0.0).data)
    # editing the file (size/mtime change) rebuilds
    with open(src, 'a', encoding='utf-8') as f:
        f.write('iota kappa\n')
    edited = D.prepare(plan, progress=False)
    assert not edited.cache_hit and edited.cache_path != first.cache_path
    # no temp folders are left behind (only the entries and their zero-byte lock files)
    names = sorted(p.name for p in (tmp_path / 'cache').iterdir())
    assert all(n.startswith('data-') or (n.startswith('.lock-data-') and (tmp_path / 'cache' / n).stat().st_size == 0)
               for n in names), names


def test_special_tokens_are_real_distinct_and_never_ordinary(tmp_path):
    src = write(tmp_path, 'a literal <pad> and <eod> in text\n\nmore <blank><copy> words here\n\n' * 5)
    prep = D.prepare(make_plan(tmp_path, source=src, vocab_size=300, val_fraction=0.0), progress=False)
    ids = prep.special_ids
    assert list(ids) == list(D.SPECIAL_TOKENS)
    assert len(set(ids.values())) == 4 and all(0 <= i < prep.vocab_size for i in ids.values())
    added = prep.tokenizer.get_added_tokens_decoder()
    for tok, i in ids.items():
        assert added[i].content == tok and added[i].special
        assert prep.tokenizer.decode([i], skip_special_tokens=False) == tok
    # the literal strings in the corpus are ordinary text: the examples hold no pad/blank/copy id
    assert not torch.isin(prep.train, torch.tensor([prep.pad_id, prep.blank_id, prep.copy_id])).any()
    enc = prep.tokenizer.encode('x <pad> <eod> <blank> <copy>')
    assert not set(enc.ids) & set(ids.values())
    assert prep.tokenizer.decode(enc.ids) == 'x <pad> <eod> <blank> <copy>'


def test_loaded_tokenizer_by_path(tmp_path):
    src = write(tmp_path, 'hello world\n\nhello there world\n\n' * 10)
    built = D.prepare(make_plan(tmp_path, source=src, vocab_size=280, val_fraction=0.0), progress=False)
    reuse = D.prepare(make_plan(tmp_path, source=src, tokenizer=str(built.cache_path), val_fraction=0.0,
                                cache_dir=str(tmp_path / 'c2')), progress=False)
    assert reuse.special_ids == built.special_ids and torch.equal(reuse.train, built.train)
    with pytest.raises(UserError, match='no tokenizer.json'):
        D.prepare(make_plan(tmp_path, source=src, tokenizer=str(tmp_path / 'nope')), progress=False)


# ---------------------------------------------------------------------------------------------------- golden layouts

def test_packing_golden(tmp_path):
    src = write(tmp_path, 'abc\n\ndefgh\n\n  \n\nij\n')  # the blank-only document is dropped
    prep = D.prepare(make_plan(tmp_path, source=src, vocab_size=BYTES_ONLY, val_fraction=0.0), progress=False)
    # stream: a b c <eod> d e f g h <eod> i j <eod>  (13 tokens) -> two windows of N*L = 6, one token dropped
    assert tokens(prep, prep.train) == [
        [['a', 'b', 'c'], ['<eod>', 'd', 'e']],
        [['f', 'g', 'h'], ['<eod>', 'i', 'j']],
    ]
    assert prep.train_mask.all() and prep.val.shape == (0, 2, 3)
    assert prep.stats['train']['documents'] == 3 and prep.stats['train']['tokens'] == 10
    assert prep.bytes_per_token['train'] == 1.0


@pytest.mark.parametrize('side', ['right', 'left'])
def test_padding_golden(tmp_path, side):
    src = write(tmp_path, 'abc\n\ndefghij\n\nk\n')
    prep = D.prepare(make_plan(tmp_path, source=src, vocab_size=BYTES_ONLY, val_fraction=0.0, layout='padded',
                               padding_side=side), progress=False)
    P = '<pad>'
    if side == 'right':
        want = [[['a', 'b', 'c'], [P, P, P]], [['d', 'e', 'f'], ['g', 'h', 'i']], [['k', P, P], [P, P, P]]]
    else:
        want = [[[P, P, P], ['a', 'b', 'c']], [['d', 'e', 'f'], ['g', 'h', 'i']], [[P, P, P], [P, P, 'k']]]
    assert tokens(prep, prep.train) == want
    assert torch.equal(prep.train_mask, prep.train != prep.pad_id)
    assert prep.train_mask.sum().item() == 3 + 6 + 1  # the 7-token document is truncated to N*L = 6
    assert prep.stats['train']['padding_fraction'] == pytest.approx(8 / 18)


def test_full_length_only(tmp_path):
    src = write(tmp_path, 'abc\n\ndefghij\n\nklmnop\n\nq\n')
    padded = D.prepare(make_plan(tmp_path, source=src, vocab_size=BYTES_ONLY, val_fraction=0.0, layout='padded',
                                 full_length_only=True), progress=False)
    assert tokens(padded, padded.train) == [[['d', 'e', 'f'], ['g', 'h', 'i']], [['k', 'l', 'm'], ['n', 'o', 'p']]]
    assert padded.train_mask.all() and padded.stats['train']['documents_used'] == 2
    packed = D.prepare(make_plan(tmp_path, source=src, vocab_size=BYTES_ONLY, val_fraction=0.0, full_length_only=True),
                       progress=False)
    # only the long documents enter the stream: d..j <eod> k..p <eod> = 15 tokens -> 2 windows
    assert tokens(packed, packed.train) == [[['d', 'e', 'f'], ['g', 'h', 'i']], [['j', '<eod>', 'k'], ['l', 'm', 'n']]]
    with pytest.raises(UserError, match='longer than every train document') as e:
        D.prepare(make_plan(tmp_path, source=src, vocab_size=BYTES_ONLY, val_fraction=0.0, layout='padded',
                            full_length_only=True, chunks=4), progress=False)
    assert e.value.where == 'Data.full_length_only = True' and 'full_length_only = False' in e.value.fix


# ---------------------------------------------------------------------------------------------------- batches

def batches(x, m, **kw):
    return D.Batches(D.TensorExamples(x, m), **kw)


def ids_batches(b, steps):
    return [next(b)[0][:, 0, 0].tolist() for _ in range(steps)]


def example_set(n=10):
    x = torch.arange(n).view(n, 1, 1).expand(n, 2, 3).contiguous()  # example i is all i: easy to identify
    return x, torch.ones_like(x, dtype=torch.bool)


def test_batches_deterministic_epochs_are_permutations():
    x, m = example_set(10)
    a = ids_batches(batches(x, m, batch_size=5, seed=1), 8)
    assert a == ids_batches(batches(x, m, batch_size=5, seed=1), 8)
    assert a != ids_batches(batches(x, m, batch_size=5, seed=2), 8)
    for epoch in range(4):
        assert sorted(a[2 * epoch] + a[2 * epoch + 1]) == list(range(10))
    assert a[0] + a[1] != a[2] + a[3]  # reshuffled each epoch
    tok, mask = next(batches(x, m, batch_size=5, seed=1))
    assert tok.shape == (5, 2, 3) and tok.dtype == torch.int64 and mask.dtype == torch.bool
    # a batch larger than the split straddles epochs, still every example equally often
    big = ids_batches(batches(x, m, batch_size=15, seed=0), 2)
    assert sorted(big[0] + big[1]) == sorted(list(range(10)) * 3)


def test_batches_resume_mid_epoch():
    x, m = example_set(10)
    b = batches(x, m, batch_size=3, seed=7)
    ids_batches(b, 5)  # 15 examples: epoch 1, index 5 (a batch straddled the boundary)
    state = json.loads(json.dumps(b.state_dict()))  # survives a checkpoint round trip
    assert (state['epoch'], state['index']) == (1, 5)
    expected = ids_batches(b, 6)
    resumed = batches(x, m, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    assert ids_batches(resumed, 6) == expected
    with pytest.raises(UserError, match='seed'):
        batches(x, m, batch_size=3, seed=8).load_state_dict(state)


def test_batches_ddp_shards_are_disjoint_and_cover_the_global_batch():
    x, m = example_set(12)
    whole = ids_batches(batches(x, m, batch_size=6, seed=3), 4)
    ranks = [ids_batches(batches(x, m, batch_size=6, seed=3, rank=r, world=3), 4) for r in range(3)]
    for step in range(4):
        parts = [ranks[r][step] for r in range(3)]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == whole[step]
        assert len(set(sum(parts, []))) == 6
    with pytest.raises(UserError, match='divisible'):
        batches(x, m, batch_size=5, seed=0, world=2)


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('var', ['HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'])
def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch, var):
    for v in D.OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, '1')
    with pytest.raises(UserError) as e:
        D.prepare(make_plan(tmp_path, source='hub:HuggingFaceFW/fineweb-edu:sample-10BT', max_documents=10),
                  progress=False)
    assert e.value.where == "Data.source = 'hub:HuggingFaceFW/fineweb-edu:sample-10BT'"
    assert 'offline' in e.value.what and var in e.value.what
    assert 'embedded' in e.value.fix
    assert not (tmp_path / 'cache').exists() or not any((tmp_path / 'cache').iterdir())


def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    import datasets
    for v in D.OFFLINE_VARS:
        monkeypatch.delenv(v, raising=False)

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'huggingface.co'")
    monkeypatch.setattr(datasets, 'load_dataset', no_network)
    with pytest.raises(UserError) as e:
        D.prepare(make_plan(tmp_path, source='hub:some/corpus', max_documents=10), progress=False)
    assert e.value.where == "Data.source = 'hub:some/corpus'"
    assert 'could not stream' in e.value.what and "Couldn't reach" in e.value.what and 'reachable' in e.value.fix


def test_bad_inputs(tmp_path):
    cases = [
        (dict(source=str(tmp_path / 'missing.txt')), 'Data.source', 'no such file'),
        (dict(source=write(tmp_path, '\n\n  \n', 'empty.txt')), 'Data.source', 'empty'),
        (dict(source=write(tmp_path, 'x', 'notes.md')), 'Data.source', 'unsupported file type'),
        (dict(vocab_size=100), 'Data.vocab_size', 'vocabulary too small'),
        (dict(val_fraction=1.0), 'Data.val_fraction', '[0, 1)'),
    ]
    latin = tmp_path / 'latin1.txt'
    latin.write_bytes('caf\u00e9 cr\u00e8me'.encode('latin-1'))
    cases.append((dict(source=str(latin)), 'Data.source', 'UTF-8'))
    for data, where, what in cases:
        with pytest.raises(UserError) as e:
            D.prepare(make_plan(tmp_path, **data), progress=False)
        assert e.value.where.startswith(where) and what in e.value.what, (data, str(e.value))
    with pytest.raises(UserError) as e:
        D.prepare(make_plan(tmp_path, vocab_size=259), progress=False)
    assert '>= 260' in e.value.fix
    # a corpus smaller than one example
    with pytest.raises(UserError, match='fewer than one example'):
        D.prepare(make_plan(tmp_path, source=write(tmp_path, 'ab', 'tiny.txt'), vocab_size=BYTES_ONLY,
                            val_fraction=0.0), progress=False)


def test_jsonl_source_and_text_field(tmp_path):
    rows = [{'text': f'row {i} says hello', 'id': i} for i in range(30)]
    p = tmp_path / 'c.jsonl'
    p.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    prep = D.prepare(make_plan(tmp_path, source=str(p), vocab_size=BYTES_ONLY, val_fraction=0.2, max_documents=20),
                     progress=False)
    assert prep.stats['train']['documents'] + prep.stats['val']['documents'] == 20
    with pytest.raises(UserError, match="no field 'body'") as e:
        D.prepare(make_plan(tmp_path, source=str(p), text_field='body'), progress=False)
    assert e.value.where == "Data.text_field = 'body'"


def test_cli_bad_spec_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        D.main([str(tmp_path / 'nope.gin')])
    assert e.value.code == 2 and 'error:' in capsys.readouterr().err
