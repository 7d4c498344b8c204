"""Generation and scoring (runtime/decoding.py with a KV cache, runtime/window.py without one, runtime/scoring.py):
decoding through the cache reproduces the trained forward pass at every position, greedy decoding equals argmax by
full recomputation, the cache is the size the cost model says, families without a cache score and generate as
their trained forward pass, and the CLI generates from a real run and refuses bad input with one message (exit 2,
no traceback)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, in_process, no_run, rt_argv, rt_env, rt_main, rt_run_dir, rt_run_ids

from compiler.cost import kv_cache_bytes
from compiler.errors import UserError
from compiler.model import build
from compiler.spec import load
from runtime import decoding as D
from runtime import generate as G
from runtime import reading as R
from runtime import scoring as S

VOCAB = 300
SMALL = ['D_MODEL=32', 'N_HEADS=2', f'VOCAB={VOCAB}']  # 4 chunks x 8 tokens (specs/base/tiny.gin)
CASES = {'memory-fixed': ('specs/memory_clm.gin', []),
         'memory-variable': ('specs/memory_clm.gin', ["Memory.slots = 'variable'"]),
         'no_memory-variable': ('specs/no_memory.gin', ["Memory.slots = 'variable'"]),
         'full_context': ('specs/full_context.gin', [])}
TOL = dict(atol=1e-5, rtol=1e-5)


def model_of(case, extra=()):
    spec, bindings = CASES[case]
    plan = load([spec], SMALL + bindings + list(extra)).plan
    return plan, build(plan, VOCAB).eval()  # untrained, seeded by Run.seed


def random_tokens(batch, length, seed=0):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, plan, tokens):
    """model(tokens) over whole [B, N, L] examples, flattened to [B, N*L, vocab]: the training forward pass."""
    n, l = plan.memory.chunks, plan.memory.chunk_len
    return model(tokens.view(len(tokens), n, l)).flatten(1, 2)


# --------------------------------------------------------------------------------------------- library

@pytest.mark.parametrize('case', CASES)
@torch.no_grad()
def test_teacher_forced_decoding_through_the_cache_reproduces_the_forward_pass(case):
    """One token at a time from the first, through every chunk boundary (memory models encode each finished chunk
    and restart the cache), the scores at every position of all N chunks equal model(tokens); so does a prefill
    that stops at any position (complete chunks encoded in one batched call, the rest prefilled)."""
    plan, model = model_of(case)
    total = plan.memory.chunks * plan.memory.chunk_len
    tokens = random_tokens(2, total)
    ref = full_logits(model, plan, tokens)
    state = D.prefill(model, tokens[:, :1])
    got = [state.logits]
    for i in range(1, total):
        state = D.step(model, state, tokens[:, i])
        got.append(state.logits)
    torch.testing.assert_close(torch.stack(got, 1), ref, **TOL)
    for t in range(1, total + 1):
        torch.testing.assert_close(D.prefill(model, tokens[:, :t]).logits, ref[:, t - 1], **TOL)


@pytest.mark.parametrize('case', ['memory-fixed', 'memory-variable'])
@torch.no_grad()
def test_memories_slide_past_the_last_slot(case):
    """Past N chunks the decoder keeps the newest N-1 memories: decoding 6.5 chunks token by token ends in the state
    a prefill of just the last 3 chunks + the current one gives, and a prefill of all of it reports 3 dropped chunks."""
    plan, model = model_of(case)
    l = plan.memory.chunk_len
    tokens = random_tokens(1, 6 * l + 3, seed=1)
    state = D.prefill(model, tokens[:, :1])
    for i in range(1, tokens.shape[1]):
        state = D.step(model, state, tokens[:, i])
    window = D.prefill(model, tokens[:, 3 * l:])
    assert state.memories.shape[1] == window.memories.shape[1] == plan.memory.chunks - 1
    torch.testing.assert_close(state.logits, window.logits, **TOL)
    everything = D.prefill(model, tokens)
    assert everything.dropped == 3 and window.dropped == 0
    torch.testing.assert_close(everything.logits, window.logits, **TOL)


@pytest.mark.parametrize('case', ['memory-fixed', 'memory-variable', 'full_context'])
def test_greedy_generation_is_deterministic_and_equals_argmax_by_full_recomputation(case):
    """Greedy tokens across three chunk boundaries equal the argmax of model(tokens so far) recomputed from scratch
    at every step (no cache); a second call gives the same tokens, and seeded sampling is reproducible too."""
    plan, model = model_of(case)
    total = plan.memory.chunks * plan.memory.chunk_len
    prompt = random_tokens(1, 5, seed=2)
    out = D.generate(model, prompt, max_new_tokens=total - 5 + 1)
    seq = prompt[0].tolist()
    with torch.no_grad():
        while len(seq) < 5 + len(out.tokens[0]):
            padded = torch.zeros(1, total, dtype=torch.long)  # positions after the last real token cannot matter
            padded[0, :len(seq)] = torch.tensor(seq)
            seq.append(int(full_logits(model, plan, padded)[0, len(seq) - 1].argmax()))
    assert len(out.tokens[0]) == total - 4
    assert out.tokens[0] == seq[5:]
    assert D.generate(model, prompt, max_new_tokens=total - 4).tokens == out.tokens
    eod = out.tokens[0][6]  # generation stops before the first eod token
    assert (D.generate(model, prompt, max_new_tokens=total - 4, eod=eod).tokens[0]
            == out.tokens[0][:out.tokens[0].index(eod)])

    def sampled(seed):
        return D.generate(model, prompt, max_new_tokens=20, temperature=1.0, top_k=50,
                          generator=torch.Generator().manual_seed(seed)).tokens
    assert sampled(0) == sampled(0) != out.tokens[:20]


@pytest.mark.parametrize('case,extra', [(c, []) for c in CASES] + [('full_context', ['decoder/Stack.n_kv_heads = 1'])],
                         ids=list(CASES) + ['full_context-gqa'])
def test_kv_cache_bytes_equal_the_cost_model(case, extra):
    plan, model = model_of(case, extra)
    state = D.prefill(model, random_tokens(1, 3))
    kv = state.cache.kv
    assert kv.numel() * kv.element_size() == state.cache.nbytes == kv_cache_bytes(plan)
    assert D.generate(model, random_tokens(1, 3), max_new_tokens=2).kv_cache_bytes == kv_cache_bytes(plan)


# --------------------------------------------------------------------------------------------- batches

RAGGED = [1, 5, 8, 9, 17, 30, 9, 40]  # lengths: every phase of the 8-token chunk, 0..3 memories, slid past N-1


def ragged_rows(lengths=RAGGED, seed=3):
    return [random_tokens(1, n, seed=seed + i)[0].tolist() for i, n in enumerate(lengths)]


@pytest.mark.parametrize('case', CASES)
def test_batched_ragged_greedy_generation_equals_each_row_alone(case):
    """One call over rows of 1..40 tokens (causal LMs: left padding; memory models: rows grouped by chunk phase and
    memory count) gives every row exactly the greedy tokens it gets alone, across chunk roll-overs."""
    plan, model = model_of(case)
    window = plan.memory.chunks * plan.memory.chunk_len
    rows = [r[-(window - 12):] for r in ragged_rows()] if case == 'full_context' else ragged_rows()
    batch = D.generate(model, rows, max_new_tokens=12)
    alone = [D.generate(model, torch.tensor([r]), max_new_tokens=12).tokens[0] for r in rows]
    assert batch.tokens == alone
    assert len({len(r) for r in rows}) > 4 and all(len(t) == 12 for t in alone)


@torch.no_grad()
def test_left_padded_rows_read_their_tokens_from_position_zero():
    """A causal row left-padded with junk (masked) gets the scores of the unpadded row: real positions start at 0."""
    plan, model = model_of('full_context')
    real = random_tokens(1, 9, seed=4)
    junk = random_tokens(1, 6, seed=5)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)], 1)
    padded = D.prefill(model, torch.cat([junk, real], 1), mask=mask, keep=9)
    plain = D.prefill(model, real, keep=9)
    torch.testing.assert_close(padded.scores, plain.scores, **TOL)
    torch.testing.assert_close(padded.scores, full_logits(model, plan, F_pad(real, plan))[:, :9], **TOL)


def F_pad(tokens, plan):
    """Right-pad [1, t] to a whole [1, N*L] example (positions after the real ones cannot change their scores)."""
    out = torch.zeros(1, plan.memory.chunks * plan.memory.chunk_len, dtype=torch.long)
    out[:, :tokens.shape[1]] = tokens
    return out


@pytest.mark.parametrize('case', CASES)
def test_scores_equal_the_forward_pass(case):
    """score(): the log-probability of every continuation token equals log_softmax of model(tokens) at the position
    before it (1e-5), for ragged context/continuation pairs scored in one batch, chunk boundaries included."""
    plan, model = model_of(case)
    total = plan.memory.chunks * plan.memory.chunk_len
    seq = random_tokens(1, total, seed=6)
    ref = torch.log_softmax(full_logits(model, plan, seq)[0], -1)
    splits = [(1, 31), (3, 5), (8, 8), (9, 14), (16, 1), (20, 12), (31, 1)]  # (context length, continuation length)
    ctxs = [seq[0, :c].tolist() for c, _ in splits]
    conts = [seq[0, c:c + k].tolist() for c, k in splits]
    got = S.score(model, ctxs, conts, batch_size=3)
    for (c, k), sc, cont in zip(splits, got, conts):
        want = ref[torch.arange(c - 1, c + k - 1), torch.tensor(cont)]
        torch.testing.assert_close(torch.tensor(sc.logprobs), want, **TOL)
        assert sc.greedy == (ref[c - 1:c + k - 1].argmax(-1) == torch.tensor(cont)).tolist()


# Families and decoders without a KV cache: the trained forward pass over the window (runtime/window.py)
FORWARD = {'memory-mixer': (['specs/memory_clm.gin', 'specs/base/mixer.gin'], []),
           'clm-mixer': (['specs/clm.gin', 'specs/base/mixer.gin'], []),
           'recurrent': (['specs/recurrent.gin'], []),
           'oracle': (['specs/oracle.gin'], [])}


def forward_model(case):
    specs, bindings = FORWARD[case]
    plan = load(specs, SMALL + bindings).plan
    return plan, build(plan, VOCAB).eval()


def masked_logits(model, plan, row: list[int]) -> torch.Tensor:
    """[len(row), vocab]: model(row right-padded to N x L, key mask on the real tokens), the training layout."""
    n, l = plan.memory.chunks, plan.memory.chunk_len
    tokens, mask = torch.zeros(1, n * l, dtype=torch.long), torch.zeros(1, n * l, dtype=torch.bool)
    tokens[0, :len(row)], mask[0, :len(row)] = torch.tensor(row), True
    km = None if len(row) == n * l else mask.view(1, n, l)
    return model(tokens.view(1, n, l), km).flatten(1, 2)[0, :len(row)]


@pytest.mark.parametrize('case', FORWARD)
@torch.no_grad()
def test_forward_readings_score_and_generate_as_the_trained_graph(case):
    """Without a KV cache (masked mixers, recurrent, oracle): every score equals log_softmax of the trained forward
    pass over the text read so far (key-masked padding; 1e-5), ragged pairs in one batch; greedy tokens equal the
    argmax of that forward pass recomputed at every step; text beyond the window keeps its newest whole chunks."""
    plan, model = forward_model(case)
    how = R.reading(model)
    n, l = plan.memory.chunks, plan.memory.chunk_len
    assert how.forward and how.window == n * l
    seq = random_tokens(1, n * l, seed=6)[0].tolist()
    splits = [(1, 31), (3, 5), (8, 8), (9, 14), (16, 1), (20, 12), (31, 1)]
    got = S.score(model, [seq[:c] for c, _ in splits], [seq[c:c + k] for c, k in splits], batch_size=3)
    for (c, k), sc in zip(splits, got):
        ref = torch.log_softmax(masked_logits(model, plan, seq[:c + k]), -1)
        want = ref[torch.arange(c - 1, c + k - 1), torch.tensor(seq[c:c + k])]
        torch.testing.assert_close(torch.tensor(sc.logprobs), want, **TOL)
    prompt = seq[:5]
    out = D.generate(model, [prompt], max_new_tokens=n * l - 3)  # runs past the window: old chunks (tokens) drop
    row = list(prompt)
    for _ in range(n * l - 3):
        window = row[-n * l:] if plan.family == 'clm' else row[max(0, -(-len(row) // l) - n) * l:]
        row.append(int(masked_logits(model, plan, window)[-1].argmax()))
    assert out.tokens[0] == row[5:]
    if plan.family != 'recurrent':
        with pytest.raises(UserError, match='--memory full_context'):
            R.reading(model, 'full_context')


def test_memories_of_a_shared_context_are_encoded_once():
    """Prompts after one context: its chunks are encoded once (an LRU keyed by chunk tokens), and the output equals
    generating without the cache."""
    plan, model = model_of('memory-fixed')
    context = random_tokens(1, 24, seed=7)[0].tolist()
    rows = [context + random_tokens(1, n, seed=8 + n)[0].tolist() for n in (2, 3, 5)]
    cache = R.MemoryCache()
    cached = D.generate(model, rows, max_new_tokens=4, memory_cache=cache)
    assert cached.tokens == D.generate(model, rows, max_new_tokens=4).tokens
    assert (cache.misses, cache.hits) == (3, 6)  # the three context chunks once; later prompts hit


@torch.no_grad()
def test_ablated_reading_is_the_training_ablation():
    """--memory ablated: the decoder reads pad slots only, exactly model(tokens, ablate_memory=True)."""
    plan, model = model_of('memory-fixed')
    seq = random_tokens(1, 32, seed=9)
    ref = torch.log_softmax(model(seq.view(1, 4, 8), ablate_memory=True).flatten(1, 2)[0], -1)
    got = S.score(model, [seq[0, :20].tolist()], [seq[0, 20:].tolist()], mode='ablated')[0]
    torch.testing.assert_close(torch.tensor(got.logprobs), ref[torch.arange(19, 31), seq[0, 20:]], **TOL)


def test_full_context_reading_is_the_decoder_over_tokens_alone():
    """--memory full_context: a memory model's decoder reads the tokens in its S + L window, no slots, no memories;
    the modes that mean nothing for a family are refused with one message."""
    plan, model = model_of('memory-fixed')
    how = R.reading(model, 'full_context')
    assert how.causal and how.window == plan.memory.chunks + plan.memory.chunk_len
    seq = random_tokens(1, 12, seed=10)
    with torch.no_grad():
        ref = torch.log_softmax(model.decoder.head(model.decoder(seq)), -1)[0]
    got = S.score(model, [seq[0, :4].tolist()], [seq[0, 4:].tolist()], mode='full_context')[0]
    torch.testing.assert_close(torch.tensor(got.logprobs), ref[torch.arange(3, 11), seq[0, 4:]], **TOL)
    long = random_tokens(1, 22, seed=13)[0].tolist()  # a continuation longer than the window: rolling pieces of 6
    got = S.score(model, [long[:2]], [long[2:]], mode='full_context')[0]
    want = []
    for s in range(2, 22, 6):
        window = torch.tensor([long[:s + 6][:-1][-12:]])
        with torch.no_grad():
            lp = torch.log_softmax(model.decoder.head(model.decoder(window)), -1)[0]
        piece = long[s:s + 6]
        want += lp[torch.arange(window.shape[1] - len(piece), window.shape[1]), torch.tensor(piece)].tolist()
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want), **TOL)
    with pytest.raises(UserError, match="a 'no_memory' model forms no memories, so there is nothing to ablate"):
        R.reading(model_of('no_memory-variable')[1], 'ablated')
    with pytest.raises(UserError, match="a 'full_context' model reads every context token in its window already"):
        R.reading(model_of('full_context')[1], 'full_context')


@torch.no_grad()
def test_compression_sweep_readings_are_the_forward_pass_at_that_shape():
    """reading(chunk_len=4): scores equal model(tokens) over 4 chunks of 4 tokens (the encoder and decoder read
    shorter chunks as they are); reading(keep=1): the decoder keeps only the newest memory, as a prefill of the last
    chunk + the current one does; out-of-range sweeps are refused with one message."""
    plan, model = model_of('memory-fixed')
    seq = random_tokens(1, 16, seed=11)
    ref = torch.log_softmax(model(seq.view(1, 4, 4)).flatten(1, 2)[0], -1)
    got = S.score(model, [seq[0, :3].tolist()], [seq[0, 3:].tolist()], mode=R.reading(model, chunk_len=4))[0]
    torch.testing.assert_close(torch.tensor(got.logprobs), ref[torch.arange(2, 15), seq[0, 3:]], **TOL)
    seq = random_tokens(1, 30, seed=12)
    one = D.prefill(model, seq, mode=R.reading(model, keep=1))
    torch.testing.assert_close(one.logits, D.prefill(model, seq[:, 16:]).logits, **TOL)
    with pytest.raises(UserError, match=r'keep=4: the decoder reads 0..3 memories in on mode'):
        R.reading(model, keep=4)
    with pytest.raises(UserError, match=r'chunk_len=9: the encoder of this memory model reads chunks of 1..8 tokens'):
        R.reading(model, chunk_len=9)


# --------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, rt_cache):
    """A finished 2-step memory_clm run with its Zarr memory store, and beside it run folders made by hand: an
    autoencoder and a mixer (operative.gin only), an unfinished run (no weights), a full-context model (untrained)."""
    from safetensors.torch import save_file

    from runtime.data import prepare
    out = tmp_path_factory.mktemp('generate') / 'runs'
    bindings = [b for b in TINY if not b.startswith('Run.memory_store')] + ['clm/Stage.steps=2']
    assert rt_main(rt_argv('specs/memory_clm.gin', out, rt_cache, bindings)) == 0
    (run_id,) = rt_run_ids(out)
    run = rt_run_dir(out, run_id)
    data = [f"Data.cache_dir = '{rt_cache}'", f"Run.out_dir = '{out}'"]
    for name, files in (('ae', ['specs/autoencoder.gin']), ('mixer', ['specs/memory_clm.gin', 'specs/base/mixer.gin']),
                        ('full_context', ['specs/full_context.gin']), ('oracle', ['specs/oracle.gin'])):
        (out / name).mkdir()
        (out / name / 'operative.gin').write_text(load(files, TINY + data).operative)
    # untrained weights are enough for window checks and for generation without a KV cache (the mixer)
    for name in ('full_context', 'mixer'):
        plan = load([out / name / 'operative.gin']).plan
        save_file(build(plan, prepare(plan, progress=False).vocab_size).state_dict(), out / name / 'final.safetensors')
        shutil.copy(run / 'tokenizer.json', out / name)
    (out / 'unfinished').mkdir()
    shutil.copy(run / 'operative.gin', out / 'unfinished')
    return run


def cli(argv, capsys):
    """runtime.generate.main in this process: (exit code, stdout, stderr)."""
    return in_process(G.main, argv, capsys)


def test_cli_generates_from_a_real_run(tiny_run):
    """As a subprocess (the real entry point): plain text on stdout, and --json with tokens that decode to its text,
    the cache size of the cost model, and the tokens the library generates from the same weights and context."""
    argv = [sys.executable, '-m', 'runtime.generate', str(tiny_run), '--prompt', 'The for statement',
            '--context', 'The while statement is used for repeated execution as long as an expression is true.',
            '--max-new-tokens', '12']
    procs = [subprocess.Popen(a, cwd=ROOT, env=rt_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for a in (argv, argv + ['--json'])]
    (text, text_err), (js, js_err) = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], text_err + js_err
    assert 'Traceback' not in text_err + js_err
    plan, model, data = loaded(tiny_run)
    enc = lambda s: data.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    ids = enc(argv[argv.index('--context') + 1]) + enc('The for statement')
    dropped = (len(ids) - 1) // 8 - 3  # complete 8-token chunks beyond the 3 memory slots
    assert dropped > 0 and f'[generate] {dropped} context chunk(s) of 8 tokens not read' in text_err
    r = json.loads(js)
    assert 0 < len(r['tokens']) <= 12 and r['ttft_s'] > 0 and r['tokens_per_s'] > 0
    assert r['text'] == data.tokenizer.decode(r['tokens'], skip_special_tokens=False) and text == r['text'] + '\n'
    assert r['kv_cache_bytes'] == kv_cache_bytes(plan)
    assert D.generate(model, torch.tensor([ids]), max_new_tokens=12, eod=data.eod_id).tokens[0] == r['tokens']


def test_cli_conditions_on_stored_memories(tiny_run, capsys):
    """--memories STAGE:ROW reads the N-1 memories the stored example's last chunk was decoded with."""
    from store import memories as M
    code, out, err = cli([tiny_run, '--prompt', 'The', '--memories', 'clm:5', '--max-new-tokens', '6', '--json'],
                         capsys)
    assert code == 0, err
    assert '3 stored memories of clm:5' in err
    plan, model, data = loaded(tiny_run)
    mem = M.open_group(tiny_run.parent / 'memories.zarr', tiny_run.name, 'clm').rows(5, 6)[0][:, :3]
    ids = torch.tensor([data.tokenizer.encode('The', add_special_tokens=False).ids])
    assert json.loads(out)['tokens'] == D.generate(model, ids, mem, max_new_tokens=6, eod=data.eod_id).tokens[0]


def test_cli_generates_a_batch_of_prompts_after_one_context(tiny_run, capsys):
    """--prompt repeated: one JSON line per prompt, each what the library generates for that row alone."""
    context = 'The while statement is used for repeated execution as long as an expression is true.'
    prompts = ['The for statement', 'A break', 'x']
    argv = [tiny_run, '--context', context, '--max-new-tokens', 5, '--json']
    code, out, err = cli(argv + [a for p in prompts for a in ('--prompt', p)], capsys)
    assert code == 0, err
    plan, model, data = loaded(tiny_run)
    enc = lambda s: data.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    got = [json.loads(line)['tokens'] for line in out.splitlines()]
    assert got == [D.generate(model, torch.tensor([enc(context) + enc(p)]), max_new_tokens=5, eod=data.eod_id).tokens[0]
                   for p in prompts]


def loaded(run):
    """(plan, model, vocabulary) of a run folder, as runtime.generate loads it."""
    got = G.load_run(run)
    return got.plan, got.model, got.vocab


def refusals(run, stored_rows=0):
    """(argv, exact stderr) of every bad input the CLI must refuse with exit code 2."""
    runs, store = run.parent, run.parent / 'memories.zarr'
    ok = ['--prompt', 'The']
    other = 'use a memory, no_memory, clm, full_context or recurrent run'
    return {
        'missing run': (['nope', '--runs', runs, *ok], no_run('nope', f'the folder {runs}', [run.name])),
        'missing id': (['7', '--runs', runs, *ok], no_run('7', f'the folder {runs}', [run.name])),
        'missing weights': ([runs / 'unfinished', *ok],
                            f'run {runs / "unfinished"}: no weights at {runs / "unfinished" / "final.safetensors"} '
                            '(the run did not finish)\n'
                            '  fix: let the run finish (python -m runtime.run ... --resume ID), or pick '
                            'a finished --stage'),
        'empty prompt': ([run, '--prompt', ''], '--prompt: the prompt is empty\n'
                         '  fix: give --prompt some text: generation continues it'),
        'unknown stage': ([run, '--stage', 'copy', *ok], f"--stage copy: run {run} has no stage 'copy' (stages: clm)\n"
                          '  fix: pick one of the listed stages, or leave --stage out for the final weights'),
        'malformed memories': ([run, '--memories', 'clm', *ok], '--memories clm: expected STAGE:ROW, e.g. clm:0\n'
                               '  fix: name a stage of the run and a row of its stored memories'),
        'memories row': ([run, '--memories', 'clm:100000', *ok],
                         f'--memories clm:100000: row 100000 is out of range: the stage stored {stored_rows} rows\n'
                         f'  fix: pick a row in 0..{stored_rows - 1}'),
        'memories stage': ([run, '--memories', 'copy:0', *ok],
                           f"--memories copy:0: {store} run {run.name}: no stage 'copy' (stages: clm)\n"
                           '  fix: pick a listed stage'),
        'autoencoder': ([runs / 'ae', *ok], f"run {runs / 'ae'}: family 'autoencoder' cannot generate: an autoencoder "
                        'regenerates its input from one memory; it does not continue text\n  fix: decode its stored '
                        f'memories with `python -m store.analyze decode RUN`, or {other}'),
        'oracle': ([runs / 'oracle', *ok], f"run {runs / 'oracle'}: family 'oracle' cannot generate: the oracle's "
                   'encoder reads the whole sequence, future included: there is no future to read while generating\n'
                   f'  fix: score it with python -m runtime.evaluate, or {other} to generate'),
    }


@pytest.mark.parametrize('case', list(refusals(ROOT / 'runs' / '0')))
def test_cli_refuses_bad_input_with_one_message(tiny_run, capsys, case):
    from store import memories as M
    rows = M.open_group(tiny_run.parent / 'memories.zarr', tiny_run.name, 'clm').memories.shape[0]
    argv, message = refusals(tiny_run, rows)[case]
    assert cli(argv, capsys) == (2, '', f'error: {message}\n')


def test_cli_refusal_has_no_traceback_in_a_real_process(tiny_run):
    argv, message = refusals(tiny_run)['unknown stage']
    p = subprocess.run([sys.executable, '-m', 'runtime.generate', *map(str, argv)], cwd=ROOT, env=rt_env(),
                       capture_output=True, text=True, timeout=600)
    assert (p.returncode, p.stdout, p.stderr) == (2, '', f'error: {message}\n')


def test_full_context_refuses_what_does_not_fit_its_window(tiny_run, capsys):
    """A full-context model reads at most N*L = 32 tokens: a request beyond it is refused before any work, naming
    how many new tokens would fit; one that fits exactly generates."""
    folder = tiny_run.parent / 'full_context'
    plan, _, data = loaded(folder)
    n = len(data.tokenizer.encode('word word', add_special_tokens=False).ids)
    code, _, err = cli([folder, '--prompt', ' '.join(['word'] * 40)], capsys)
    assert code == 2 and "do not fit the full_context model's context of 32 tokens" in err
    assert 'fix: shorten --context/--prompt to at most 32 tokens' in err
    code, _, err = cli([folder, '--prompt', 'word word', '--max-new-tokens', 40], capsys)
    assert code == 2 and f'fix: lower --max-new-tokens to {32 - n + 1} ' in err
    code, out, err = cli([folder, '--prompt', 'word word', '--max-new-tokens', 32 - n + 1, '--json'], capsys)
    assert code == 0, err
    assert json.loads(out)['kv_cache_bytes'] == kv_cache_bytes(plan)
