"""Pretrained backbones (compiler/backbone.py, compiler/tokens.py): tiny models of every supported architecture are
built from their configs and saved with save_pretrained (compiler/tiny.py); the loading code under test is the one
that loads hub weights."""

import pytest
import torch
import transformers

from compiler import plan as P
from compiler.backbone import BackboneModule
from compiler.hub import embedding_rows
from compiler.model import build, parameters_of
from compiler.spec import load
from compiler.tokens import token_map

CAUSAL = ('llama', 'qwen2', 'qwen3', 'gpt2')


@pytest.fixture(scope='session')
def tiny(tiny_models):
    return tiny_models


def _module(src, **kw):
    b = P.Backbone(source=src, **kw)
    vocab = token_map(src, 'main', embedding_rows(src, 'main')).vocab
    torch.manual_seed(0)
    return BackboneModule(b, vocab).eval()


def _inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 7:] = False  # right padding
    return tokens, mask


@pytest.mark.parametrize('arch', CAUSAL)
def test_logits_equal_the_transformers_forward(tiny, arch):
    src = tiny(arch)
    ours = _module(src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    rows = hf.get_input_embeddings().num_embeddings
    tokens, mask = _inputs(rows)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = ours.head(ours(tokens, key_mask=mask))
        theirs = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).logits
    assert logits.shape[-1] == ours.vocab
    assert torch.allclose(logits[..., :rows][mask], theirs[mask], atol=1e-5), (logits[..., :rows] - theirs).abs().max()
    unpadded = ours.head(ours(tokens[:1]))[..., :rows]
    assert torch.allclose(unpadded, hf(input_ids=tokens[:1]).logits, atol=1e-5)


def test_bert_hidden_states_equal_the_transformers_forward(tiny):
    src = tiny('bert')
    ours = _module(src)
    hf = transformers.AutoModel.from_pretrained(src).eval()
    tokens, mask = _inputs(hf.get_input_embeddings().num_embeddings)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = ours(tokens, key_mask=mask)
        theirs = hf(input_ids=tokens, attention_mask=mask.long(), position_ids=positions).last_hidden_state
    assert torch.allclose(h[mask], theirs[mask], atol=1e-5)


@pytest.mark.parametrize('arch', ('llama', 'gpt2'))
def test_lora_starts_as_the_identity_and_trains_away_from_it(tiny, arch):
    src = tiny(arch)
    base = _module(src)
    lora = _module(src, lora=P.Lora(r=4, alpha=8.0))
    tokens, mask = _inputs(base.rows)
    with torch.no_grad():
        assert torch.equal(lora(tokens, key_mask=mask), base(tokens, key_mask=mask))
        for n, p in lora.members('lora'):
            if 'lora_B' in n:
                p.normal_()
        assert not torch.allclose(lora(tokens, key_mask=mask), base(tokens, key_mask=mask))


def test_special_tokens_use_the_vocabulary_and_new_rows_are_counted(tiny):
    """vocab = embedding rows + new rows, and the graph's head scores exactly that many tokens."""
    expect = {'llama': ('reserved', 0), 'qwen3': ('spare embedding row', 0), 'gpt2': ('new embedding row', 2),
              'bert': ('mask_token', 0)}
    for arch, (blank_from, new) in expect.items():
        src = tiny(arch)
        rows = embedding_rows(src, 'main')
        t = token_map(src, 'main', rows)
        assert t.origin['<blank>'].startswith(blank_from), (arch, t.origin)
        assert len(t.new) == new and t.vocab == rows + new
        assert len(set(t.ids[k] for k in ('<pad>', '<blank>', '<copy>'))) == 3 and max(t.ids.values()) < t.vocab
        m = _module(src)
        assert m.head.out_features == t.vocab
        assert arch == 'bert' or m.head.weight.shape[0] == t.vocab
        assert (0 if m.new_tokens is None else m.new_tokens.shape[0]) == new


def _spec(tmp_path, text, bindings=()):
    f = tmp_path / 'spec.gin'
    f.write_text(text)
    return load([str(f)], list(bindings))


ICAE = '''
Plan.family = 'autoencoder'
Plan.encoder = @encoder/Backbone()
encoder/Backbone.source = %SRC
encoder/Backbone.lora = @encoder/Lora()
encoder/Lora.r = 4
Plan.decoder = @decoder/Backbone()
decoder/Backbone.source = %SRC
decoder/Backbone.share_encoder = True
Memory.chunks = 2
Memory.chunk_len = 8
Plan.memory = @Memory()
Plan.curriculum = [@ae/Stage()]
ae/Stage.objectives = [@ae/Objective()]
ae/Objective.kind = 'autoencode'
'''


def test_a_decoder_sharing_the_encoder_base_runs_it_without_the_adapter(tiny, tmp_path):
    src = tiny('llama')
    plan = _spec(tmp_path, f"SRC = '{src}'\n" + ICAE).plan
    model = build(plan).eval()
    assert model.decoder.shared is model.encoder and not model.decoder.members()
    with torch.no_grad():
        for _, p in model.encoder.members('lora'):
            p.normal_()  # a trained adapter
    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        assert torch.allclose(model.decoder(embeds=x), hf.model(inputs_embeds=x).last_hidden_state, atol=1e-5)
        assert not torch.allclose(model.encoder(embeds=x), hf.model(inputs_embeds=x).last_hidden_state, atol=1e-3)
    assert set(model.pretrained_frozen()) == {'encoder.base'}


def test_a_stage_trains_only_adapters_and_memspec_parameters(tiny, tmp_path):
    """Every base tensor is bit-identical after training steps; the adapters, memory and memspec's encoder move."""
    from compiler import objectives as O
    from runtime.train import optimizer, set_frozen, stage_loss
    src = tiny('llama')
    plan = _spec(tmp_path, f"""
Plan.family = 'memory'
Plan.encoder = @encoder/Stack()
encoder/Stack.d_model = 32
encoder/Stack.n_heads = 2
encoder/Stack.causal = False
Plan.decoder = @decoder/Backbone()
decoder/Backbone.source = '{src}'
decoder/Backbone.lora = @decoder/Lora()
decoder/Lora.r = 4
Memory.chunks = 2
Memory.chunk_len = 8
Plan.memory = @Memory()
Plan.curriculum = [@s/Stage()]
s/Stage.freeze = ['decoder.layers.0']
s/Stage.objectives = [@clm/Objective(), @b/Objective()]
clm/Objective.kind = 'clm'
b/Objective.kind = 'blank_copy'
""").plan
    model = build(plan)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = plan.curriculum[0]
    opt, _ = optimizer(set_frozen(model, stage), stage)
    ids = O.SpecialIds(pad=301, blank=302, copy=303)
    tokens = torch.randint(0, 300, (4, 2, 8))
    for _ in range(3):
        opt.zero_grad()
        stage_loss(model, stage, tokens, None, ids)[0].backward()
        opt.step()
    after = dict(model.named_parameters())
    base = {n for n, _ in parameters_of(model, 'decoder.base')}
    layer0 = {n for n, _ in parameters_of(model, 'decoder.layers.0')}
    assert base and all(torch.equal(before[n], after[n]) for n in base | layer0)
    moved = {n for n in after if not torch.equal(before[n], after[n])}
    lora = {n for n, _ in parameters_of(model, 'decoder.lora')}
    assert moved == (lora - layer0) | {n for n in after if not n.startswith('decoder.')}
    assert set(model.state_dict()) == lora | {n for n in model.state_dict() if not n.startswith('decoder.')}


PROBE = 'specs/pretrained/{}_information.gin'


def _refused(spec, bindings):
    from compiler.errors import SpecError
    with pytest.raises(SpecError) as e:
        load([spec], bindings)
    return e.value


def test_every_pretrained_spec_compiles_against_tiny_models(tiny):
    for spec, macro, arch in (('llama_copy_memory', 'LLAMA', 'llama'), ('llama_information', 'LLAMA', 'llama'),
                              ('qwen_information', 'QWEN', 'qwen3'), ('bert_information', 'BERT', 'bert'),
                              ('icae_autoencoder', 'LLAMA', 'llama')):
        plan = load([f'specs/pretrained/{spec}.gin'], [f"{macro} = '{tiny(arch)}'"]).plan
        model = build(plan)
        from compiler.cost import components, params
        assert sorted(model.components()) == sorted(components(plan)), spec
        # the cost model's parameter groups partition the built graph's parameters (a backbone's layers hold
        # adapters that count under lora)
        groups = {k: {id(p) for n, p in parameters_of(model, k) if k.endswith('.lora') or 'lora_' not in n}
                  for k in params(plan)}
        assert {k: sum(dict((id(p), p.numel()) for p in model.parameters())[i] for i in g)
                for k, g in groups.items()} == params(plan), spec
        assert sum(map(len, groups.values())) == len(set().union(*groups.values())) == len(list(model.parameters()))


def test_a_model_missing_from_the_cache_names_the_command_that_fetches_it():
    e = _refused(PROBE.format('qwen'), ["QWEN = 'memspec-tests/not-cached'"])
    assert e.where == ("binding -b 'QWEN = 'memspec-tests/not-cached'' (macro QWEN, used at "
                       'specs/pretrained/qwen_information.gin:11)')
    assert "'memspec-tests/not-cached' (revision 'main') is not in the local Hugging Face cache" in e.what
    assert 'hf download memspec-tests/not-cached --revision main' in e.fix


def test_bad_backbones_are_refused_at_their_binding(tiny, tmp_path):
    llama, gpt2, bert = tiny('llama'), tiny('gpt2'), tiny('bert')
    e = _refused(PROBE.format('llama'), [f"LLAMA = '{llama}'", 'encoder/Backbone.trust_remote_code = True'])
    assert e.where == "binding -b 'encoder/Backbone.trust_remote_code = True'" and 'is refused' in e.what
    e = _refused('specs/pretrained/llama_copy_memory.gin', [f"LLAMA = '{bert}'"])
    assert e.where == f"binding -b 'LLAMA = '{bert}'' (macro LLAMA, used at specs/pretrained/llama_copy_memory.gin:18)"
    assert e.what.startswith(f"decoder Backbone {bert} is a bidirectional encoder ('bert'): it cannot decode")
    e = _refused('specs/pretrained/icae_autoencoder.gin',
                 [f"LLAMA = '{llama}'", f"decoder/Backbone.source = '{gpt2}'",
                  'decoder/Backbone.share_encoder = False'])
    assert e.where == f"binding -b 'decoder/Backbone.source = '{gpt2}''"
    assert 'has another tokenizer than the encoder Backbone' in e.what
    e = _refused('specs/pretrained/icae_autoencoder.gin',
                 [f"LLAMA = '{llama}'", "encoder/Lora.target_modules = ['nope']"])
    assert e.where == "binding -b 'encoder/Lora.target_modules = ['nope']'"
    assert 'peft cannot place the adapters' in e.what
    e = _refused(PROBE.format('llama'), [f"LLAMA = '{llama}'", "probe/Stage.freeze = ['encoder.layers.0-7']"])
    assert "freezes 'encoder.layers.0-7', but the encoder has 2 layers (0-1)" in e.what
    e = _refused(PROBE.format('llama'), [f"LLAMA = '{llama}'", "probe/Stage.freeze = ['encoder.lora']"])
    assert 'but the encoder Backbone has no Lora' in e.what
    e = _refused(PROBE.format('llama'), [f"LLAMA = '{llama}'", "Data.tokenizer = 'x'"])
    assert 'uses the tokenizer of' in e.what
    e = _refused(PROBE.format('llama'), ["LLAMA = './no/such/folder'"])
    assert "no model folder at './no/such/folder'" in e.what
    e = _refused(PROBE.format('llama'),
                 [f"LLAMA = '{llama}'", 'encoder/Lora.r = 0', 'encoder/Backbone.lora = @encoder/Lora()'])
    assert e.where == "binding -b 'encoder/Lora.r = 0'" and 'Lora.r must be >= 1' in e.what


def test_block_ranges_freeze_memspec_stacks_and_backbones(tiny):
    plan = load(['specs/pretrained/llama_copy_memory.gin'],
                [f"LLAMA = '{tiny('llama')}'", "copy/Stage.freeze = ['encoder.layers.0-2', 'decoder.layers.1']"]).plan
    from compiler.cost import stage_costs
    model = build(plan)
    from runtime.train import set_frozen
    trainable = sum(p.numel() for p in set_frozen(model, plan.curriculum[0]))
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    assert (stage_costs(plan)[0].trainable, stage_costs(plan)[0].frozen) == (trainable, frozen)
    assert not any(p.requires_grad for _, p in parameters_of(model, 'encoder.layers.2'))
    assert all(p.requires_grad for _, p in parameters_of(model, 'encoder.layers.3'))
    assert all(p.requires_grad == ('lora_' in n and '.layers.0.' in n) for n, p in parameters_of(model, 'decoder'))


@pytest.mark.parametrize('arch,family', [('llama', 'memory'), ('qwen3', 'clm'), ('gpt2', 'memory')])
@torch.no_grad()
def test_decoding_through_the_kv_cache_reproduces_the_forward_pass(tiny, tmp_path, arch, family):
    """Teacher-forced decoding one token at a time through transformers' cache (memory models restart it at every
    chunk) gives model(tokens)'s scores at every position."""
    from runtime import decoding as G
    plan = _spec(tmp_path, f"""
Plan.family = '{family}'
{"Plan.encoder = @encoder/Stack()" if family == 'memory' else ''}
encoder/Stack.d_model = 32
encoder/Stack.n_heads = 2
encoder/Stack.causal = False
Plan.decoder = @decoder/Backbone()
decoder/Backbone.source = '{tiny(arch)}'
decoder/Backbone.lora = @Lora()
Memory.chunks = 3
Memory.chunk_len = 5
Plan.memory = @Memory()
Plan.curriculum = [@s/Stage()]
s/Stage.objectives = [@clm/Objective()]
clm/Objective.kind = 'clm'
""").plan
    model = build(plan).eval()
    for _, p in model.decoder.members('lora'):
        p.normal_(std=0.1)  # a trained adapter takes part in the cached forward too
    tokens = torch.randint(0, 290, (2, 15), generator=torch.Generator().manual_seed(1))
    ref = model(tokens.view(2, 3, 5)).flatten(1, 2)
    state = G.prefill(model, tokens[:, :1])
    got = [state.logits]
    for i in range(1, 15):
        state = G.step(model, state, tokens[:, i])
        got.append(state.logits)
    torch.testing.assert_close(torch.stack(got, 1), ref, atol=1e-5, rtol=1e-5)
    assert state.cache.nbytes > 0


def _saved_llama(folder, **cfg):
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=128, vocab_size=300,
                                      tie_word_embeddings=False, **cfg)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


LLAMA_STACK = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'decoder/Stack.ffn_hidden=128',
               'decoder/Stack.n_kv_heads=1']


@pytest.mark.parametrize('cfg,what,fix', [
    ({'rms_norm_eps': 1e-5, 'rope_theta': 1e4},
     'the checkpoint was trained with norm_eps 1e-05 (config.json), the stack has 1e-06',
     'bind decoder/Stack.norm_eps = 1e-05'),
    ({'rms_norm_eps': 1e-6, 'rope_theta': 5e5},
     'the checkpoint was trained with rope_theta 500000 (config.json), the stack has 10000',
     'bind decoder/Stack.rope_theta = 500000.0'),
    ({'rms_norm_eps': 1e-6, 'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 32.0,
                                                'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                                'original_max_position_embeddings': 64}},
     "uses rope scaling 'llama3'", "or load the model unconverted as a Backbone"),
])
def test_the_llama_import_reads_config_json_or_refuses(tmp_path, cfg, what, fix):
    from compiler.errors import UserError
    from runtime.checkpoint import check_init_sources, init_component
    src = _saved_llama(tmp_path / 'llama', **cfg)
    plan = load(['specs/memory_clm.gin'], LLAMA_STACK + [f"clm/Stage.init_from = {{'decoder': 'llama:{src}'}}"]).plan
    for call in (lambda: check_init_sources(plan, tmp_path, None, 300),
                 lambda: init_component(build(plan, 300), plan, 'decoder', f'llama:{src}', 0, None)):
        with pytest.raises(UserError) as e:
            call()
        assert e.value.where == f"init_from 'llama:{src}'" and what in e.value.what and fix in e.value.fix


def test_the_llama_import_loads_a_matching_config_and_refuses_a_folder_without_one(tmp_path):
    from compiler.errors import UserError
    from runtime.checkpoint import init_component
    src = _saved_llama(tmp_path / 'llama', rms_norm_eps=1e-6, rope_theta=1e4)
    plan = load(['specs/memory_clm.gin'], LLAMA_STACK).plan
    model = build(plan, 300)
    init_component(model, plan, 'decoder', f'llama:{src}', 0, None)
    hf = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    tokens = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model.decoder.head(model.decoder(tokens)), hf(tokens).logits, atol=1e-5)
    (src / 'config.json').unlink()
    with pytest.raises(UserError, match='no config.json beside the checkpoint'):
        init_component(model, plan, 'decoder', f'llama:{src}', 0, None)


def test_modules_to_save_train_in_full_and_a_missing_one_is_refused(tiny):
    src = tiny('llama')
    e = _refused(PROBE.format('llama'), [f"LLAMA = '{src}'", 'encoder/Backbone.lora = @encoder/Lora()',
                                         "encoder/Lora.modules_to_save = ['nonexistent']"])
    assert e.where == "binding -b 'encoder/Lora.modules_to_save = ['nonexistent']'"
    assert e.what == "encoder Lora: the model has no module 'nonexistent' to save"
    m = _module(src, lora=P.Lora(r=2, target_modules=('q_proj',), modules_to_save=('lm_head',)))
    names = [n for n, _ in m.members('lora')]
    assert any('modules_to_save' in n and 'lm_head' in n for n in names)
    assert not any('modules_to_save' in n for n, _ in m.members('base'))


def test_a_vocabulary_size_bound_beside_a_backbone_is_a_warning_at_its_binding(tiny):
    spec = load([PROBE.format('llama')], [f"LLAMA = '{tiny('llama')}'", 'Data.vocab_size = 4096'])
    (w,) = spec.warnings
    assert w.where == "binding -b 'Data.vocab_size = 4096'" and 'has no effect' in w.what
    assert not load([PROBE.format('llama')], [f"LLAMA = '{tiny('llama')}'"]).warnings
