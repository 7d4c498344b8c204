"""A pretrained Llama-architecture LM as the memory model's decoder: `init_from = {'decoder': 'llama:<path>'}`."""
import torch
import transformers

from compiler.errors import UserError
from compiler.model import build
from compiler.spec import load
from runtime.checkpoint import init_component

BINDINGS = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'decoder/Stack.ffn_hidden=128',
            'decoder/Stack.n_kv_heads=1']


def _llama(tmp_path, layers=2):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=128, vocab_size=300, rms_norm_eps=1e-6,
                                   rope_theta=1e4, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_decoder_loads_a_saved_llama_and_computes_the_same_logits(tmp_path):
    hf = _llama(tmp_path)
    plan = load(['specs/memory_clm.gin'], BINDINGS).plan
    model = build(plan, 300).eval()
    init_component(model, plan, 'decoder', f'llama:{tmp_path}', 0, None)
    tokens = torch.randint(0, 300, (2, 12))
    ours = model.decoder.head(model.decoder(tokens))
    with torch.no_grad():
        theirs = hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_a_checkpoint_of_another_depth_is_refused(tmp_path):
    _llama(tmp_path, layers=3)
    plan = load(['specs/memory_clm.gin'], BINDINGS).plan
    model = build(plan, 300)
    try:
        init_component(model, plan, 'decoder', f'llama:{tmp_path}', 0, None)
    except UserError as e:
        assert 'layers.2' in e.what and e.where == f"init_from 'llama:{tmp_path}'"
    else:
        raise AssertionError('a 3-layer checkpoint loaded into a 2-layer decoder')
