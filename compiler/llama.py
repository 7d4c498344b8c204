"""A Llama-architecture checkpoint (transformers' LlamaForCausalLM / LlamaModel state dict) into a
Stack, so a pretrained LM can serve as a memory model's decoder, and a Stack out as one (store/export.py). Our module
names follow Llama's, so the mapping is a rename of three top-level keys; shapes are checked, nothing is silently
skipped."""
from __future__ import annotations

import math

import torch

from compiler.blocks import Stack
from compiler.errors import UserError

_RENAMES = (('model.embed_tokens.', 'embedding.'), ('embed_tokens.', 'embedding.'), ('model.layers.', 'layers.'),
            ('model.norm.', 'norm.'), ('lm_head.', 'head.'))


def llama_to_stack(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.endswith('rotary_emb.inv_freq'):
            continue  # recomputed from rope_theta
        for old, new in _RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def llama_files(path: str) -> list:
    """The files of a Llama checkpoint: the file itself, or the *.safetensors (else pytorch_model*.bin) of a
    transformers folder (shards included)."""
    from pathlib import Path
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob('*.safetensors')) or sorted(p.glob('pytorch_model*.bin'))
    if not files:
        raise UserError(f"init_from 'llama:{path}'", 'no checkpoint file (*.safetensors or pytorch_model*.bin) found',
                        'point at a LlamaForCausalLM checkpoint file or the folder save_pretrained wrote')
    return files


def read_llama(path: str) -> dict[str, torch.Tensor]:
    """State dict of a Llama checkpoint: a .safetensors / .bin file, or a transformers folder holding one
    (or shards)."""
    files = llama_files(path)
    state = {}
    for f in files:
        try:
            if f.suffix == '.safetensors':
                from safetensors.torch import load_file
                state.update(load_file(f))
            else:
                state.update(torch.load(f, map_location='cpu', weights_only=True))
        except Exception as e:  # noqa: BLE001  (truncated, foreign or pickled-code files fail in many ways)
            text = str(e).strip()
            raise UserError(f"init_from 'llama:{path}'", f'cannot read {f}: {type(e).__name__}: '
                            f'{text.splitlines()[0] if text else ""}',
                            'the file is damaged or not a checkpoint: download or save it again')
    return state


def check_llama(stack: Stack, state: dict[str, torch.Tensor], source: str = 'checkpoint') -> dict[str, torch.Tensor]:
    """Map a Llama state dict onto `stack`'s names and check every tensor has a place of the right shape (works on a
    meta-device stack, so a run can refuse a mismatched checkpoint before anything is allocated or recorded)."""
    mapped = llama_to_stack(state)
    if 'head.weight' not in mapped and stack.head is not None and 'embedding.weight' in mapped:
        mapped['head.weight'] = mapped['embedding.weight']  # tied embeddings (e.g. Llama-3.2-1B)
    own = stack.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise UserError(source, f"checkpoint tensor '{key}' has no place in the {len(stack.layers)}-layer stack",
                            'declare the stack with the checkpoint\'s n_layers / sizes')
        if own[key].shape != value.shape:
            raise UserError(source, f"'{key}' is {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} "
                                    'in the stack',
                            'match d_model, n_heads, n_kv_heads, ffn_hidden and vocabulary (Data.tokenizer) '
                            'to the checkpoint')
    missing = [k for k in own if k not in mapped]
    if missing:
        raise UserError(source, f'checkpoint lacks {missing[:3]}{"..." if len(missing) > 3 else ""}',
                        'use a checkpoint with every layer the stack declares')
    return mapped


def load_llama(stack: Stack, state: dict[str, torch.Tensor], source: str = 'checkpoint') -> None:
    """Copy Llama weights into `stack` in place. Raises UserError naming the first mismatch."""
    stack.load_state_dict(check_llama(stack, state, source), strict=True)


def stack_to_llama(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A causal Stack's state dict (embedding, layers, norm, head) as LlamaForCausalLM names it: the inverse of
    llama_to_stack."""
    out = {}
    for key, value in state.items():
        for llama, ours in (('model.embed_tokens.', 'embedding.'), ('model.layers.', 'layers.'),
                            ('model.norm.', 'norm.'), ('lm_head.', 'head.')):
            if key.startswith(ours):
                out[llama + key[len(ours):]] = value.contiguous()
                break
        else:
            raise ValueError(f"'{key}' has no place in a Llama checkpoint")
    return out


def llama_config(stack, vocab: int, length: int, special_ids: dict[str, int]) -> dict:
    """transformers.LlamaConfig arguments of a causal transformer Stack config (compiler.plan.Stack) that reads
    `length` positions: RMSNorm, rotary positions, SiLU-gated MLP, no biases, untied head (compiler/blocks.py)."""
    return {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab,
            'hidden_size': stack.d_model, 'intermediate_size': stack.ffn, 'num_hidden_layers': stack.n_layers,
            'num_attention_heads': stack.n_heads, 'num_key_value_heads': stack.kv_heads,
            'head_dim': stack.d_model // stack.n_heads, 'hidden_act': 'silu', 'rms_norm_eps': stack.norm_eps,
            'rope_theta': stack.rope_theta, 'max_position_embeddings': stack.context or length,
            'attention_bias': False, 'mlp_bias': False, 'tie_word_embeddings': False,
            'pad_token_id': special_ids.get('<pad>'), 'eos_token_id': special_ids.get('<eod>'),
            'bos_token_id': None, 'torch_dtype': 'float32'}


def check_llama_config(cfg, path: str, where: str) -> None:
    """The config.json saved beside a Llama checkpoint against the Stack that will hold it (compiler.plan.Stack):
    memspec's Stack is declared by hand, so every setting the weights were trained with must match it or be refused
    (loading would otherwise compute other functions without a word): norm eps, rope theta, rope scaling (none: Llama
    3's 'llama3' and the other scaled variants are not implemented), activation, biases, head dim."""
    import json
    from pathlib import Path
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / 'config.json'
    backbone = (f"or load the model unconverted as a Backbone: Plan.decoder = @decoder/Backbone(), "
                f"decoder/Backbone.source = '{p if p.is_dir() else p.parent}'")
    if not f.is_file():
        raise UserError(where, f'no config.json beside the checkpoint ({f}): its norm eps and rope settings cannot be '
                        'checked against the stack', 'save the model with save_pretrained (which writes it), '
                        + backbone)
    try:
        c = json.loads(f.read_text())
        rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
        theta = rope.get('rope_theta', c.get('rope_theta', 10000.0))
        kind = rope.get('rope_type', rope.get('type', 'default'))
        head_dim = c.get('head_dim') or c['hidden_size'] // c['num_attention_heads']
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
        raise UserError(where, f'{f} is not a Llama config ({type(e).__name__}: {e})', backbone)
    if c.get('model_type', 'llama') != 'llama':
        raise UserError(where, f"{f} describes a '{c.get('model_type')}' model, not a Llama", backbone)
    if kind not in ('default', None):
        raise UserError(where, f"the checkpoint uses rope scaling '{kind}' ({f}), which memspec's Stack does not "
                        'implement: its positions would be wrong', backbone)
    problems = [(name, ours, theirs) for name, ours, theirs in (
        ('norm_eps', cfg.norm_eps, c.get('rms_norm_eps', 1e-6)), ('rope_theta', cfg.rope_theta, theta))
        if not math.isclose(float(ours), float(theirs), rel_tol=1e-9)]
    if problems:
        name, ours, theirs = problems[0]
        raise UserError(where, f'the checkpoint was trained with {name} {theirs:g} (config.json), the stack has '
                        f'{ours:g}', f"bind {cfg.scope + '/' if cfg.scope else ''}Stack.{name} = {theirs!r}")
    fixed = [(f'hidden_act {c.get("hidden_act", "silu")!r}', c.get('hidden_act', 'silu') != 'silu'),
             ('attention_bias', bool(c.get('attention_bias'))), ('mlp_bias', bool(c.get('mlp_bias'))),
             (f'head_dim {head_dim}', head_dim * cfg.n_heads != cfg.d_model)]
    for what, bad in fixed:
        if bad:
            raise UserError(where, f"the checkpoint's {what} is not what memspec's Stack computes", backbone)
