"""Pretrained Hugging Face models standing where a Stack stands (compiler.plan.Backbone).

A backbone is the model transformers' Auto classes build from a local folder or the local Hugging Face cache, never
converted: AutoModelForCausalLM for causal LMs (Llama, Qwen2/3, GPT-2, ...), AutoModel for bidirectional encoders
(BERT-style, encoder role only). BackboneModule gives the graph the interface of compiler.blocks.Stack:
`embedding(tokens)`, `forward(tokens | embeds, key_mask, positions, keep_last)` -> final hidden states, `head` (with
`.weight`), `layers` (the blocks, for sharding), `cfg.d_model`.

- Nothing is downloaded. The compiler reads config.json and builds the model on the meta device for parameter counts
  and FLOPs; a model missing from the cache is a SpecError that names the command fetching it.
- LoRA goes through peft (B starts at zero: step 0 is the base). A decoder with share_encoder runs the encoder's
  very modules with the adapter disabled (ICAE / 500xCompressor).
- Tokens memspec needs and the tokenizer lacks get new embedding rows (`new_tokens`, compiler/tokens.py); the head
  scores them with the same rows (tied).
- The state dict holds what the run trains: adapters, new rows, and the base only when Backbone.train_base. The base
  is identified by source, revision and the sha256 of its weight files (`identity`).

Parameter groups, what Stage.freeze may name under a backbone role (`encoder.base`, ...): PARTS below.

`python -m compiler.backbone --make-tiny DIR` writes tiny random models of every supported architecture (with
tokenizers) into DIR/<arch>, what the specs of specs/pretrained/ run against on a CPU (and the tests).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from compiler.hub import LAYER_RANGE, BackboneError, config, embedding_rows, info, resolve, weight_files

# Freezable parts of a backbone role. layers (and layers.I, layers.I-J) hold everything in those blocks, adapters
# included; base every pretrained weight; lora every adapter weight (and modules_to_save copies).
PARTS = ('base', 'lora', 'embedding', 'layers', 'other', 'head', 'new_tokens')
GROUPS = ('embedding', 'layers', 'other', 'head', 'new_tokens', 'lora')  # a partition: the cost model's components
ADAPTER = re.compile(r'(^|\.)(lora_[A-Za-z_]+|modules_to_save)\.')


def hf_model(b, meta: bool):
    """The transformers model of a Backbone: on the meta device from its config (shapes only, nothing read), or
    with its weights."""
    import transformers
    cfg = config(b.source, b.revision)
    cls = transformers.AutoModelForCausalLM if info(b.source, b.revision).causal else transformers.AutoModel
    transformers.utils.logging.disable_progress_bar()  # one bar per load, per rank: noise in a run's log
    if meta:
        with torch.device('meta'):
            model = cls.from_config(cfg, dtype=getattr(torch, b.dtype))
    else:
        folder = resolve(b.source, b.revision)
        weight_files(folder, b.source, b.revision)
        model = cls.from_pretrained(folder, dtype=getattr(torch, b.dtype), trust_remote_code=False,
                                    use_safetensors=True)
    if getattr(model, 'pooler', None) is not None:  # BERT's pooler reads [CLS]; memories read token states
        model.pooler = None
    return model


def with_lora(model, lora):
    """The model with peft LoRA adapters (peft freezes the base; set_frozen decides what trains)."""
    from peft import LoraConfig, get_peft_model
    targets = 'all-linear' if tuple(lora.target_modules) == ('all-linear',) else list(lora.target_modules)
    conv1d = any(type(m).__name__ == 'Conv1D' for m in model.modules())  # GPT-2 stores its linears transposed
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     modules_to_save=list(lora.modules_to_save) or None, bias='none', fan_in_fan_out=conv1d)
    import warnings
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (is_gradient_checkpointing)
            warnings.simplefilter('ignore', FutureWarning)
            peft = get_peft_model(model, cfg)
    except ValueError as e:  # a target module the model does not have
        raise BackboneError(f'peft cannot place the adapters: {str(e).splitlines()[0]}',
                            "name modules the model has (e.g. ['q_proj', 'v_proj']) or use ['all-linear']",
                            'target_modules')
    saved = {n.rsplit('.', 1)[-1] for n, m in peft.named_modules() if type(m).__name__ == 'ModulesToSaveWrapper'}
    missing = [m for m in lora.modules_to_save if m.rsplit('.', 1)[-1] not in saved]
    if missing:  # peft skips a name it does not find without a word
        raise BackboneError(f"the model has no module {missing[0]!r} to save", "name one of the model's modules "
                            "(e.g. ['lm_head'] or ['embed_tokens']), or leave modules_to_save empty", 'modules_to_save')
    return peft


def identity(b) -> dict:
    """How a run names its base model: source, revision, the snapshot folder and the sha256 of every weight file."""
    from compiler.digest import sha256_file
    folder = resolve(b.source, b.revision)
    files = weight_files(folder, b.source, b.revision)
    return {'source': b.source, 'revision': b.revision, 'folder': str(folder),
            'sha256': {f.name: _cached_sha(str(f), f.stat().st_size, f.stat().st_mtime_ns, sha256_file) for f in files}}


@functools.cache
def _cached_sha(path: str, size: int, mtime: int, digest) -> str:
    return digest(path)


class _Head:
    """The scoring head of a backbone: the model's output embedding, followed by the new rows' embeddings (tied). Not
    a module: its weights are the backbone's own parameters. `weight` is what compiler.objectives.token_loss reads."""

    def __init__(self, owner):
        self._owner = owner

    @property
    def weight(self):
        out = self._owner.body_owner().hf().get_output_embeddings()
        if out is None:
            raise ValueError(f'{self._owner.cfg.source} is an encoder without an output head')
        w = out.weight
        new = self._owner.body_owner().new_tokens
        w = w if new is None else torch.cat([w.to(new.dtype), new])
        return w.float()

    @property
    def out_features(self) -> int:
        return self._owner.vocab

    def __call__(self, h):
        return h.float() @ self.weight.T


class BackboneModule(nn.Module):
    """A Backbone in the graph (see the module docstring). `shared`: the encoder's BackboneModule whose modules a
    share_encoder decoder runs with the adapter disabled (a reference, not a child: its parameters are the
    encoder's)."""

    def __init__(self, cfg, vocab: int, shared: BackboneModule | None = None, seq_len: int | None = None):
        super().__init__()
        self.cfg, self.vocab, self.seq_len = cfg, vocab, seq_len  # seq_len: the positions the graph feeds it
        self.head = _Head(self)
        if shared is not None:
            object.__setattr__(self, 'shared', shared)
            return
        self.shared = None
        meta = torch.empty(0).device.type == 'meta'
        model = hf_model(cfg, meta)
        rows = model.get_input_embeddings().num_embeddings
        if vocab < rows:
            raise BackboneError(f'the vocabulary ({vocab}) is smaller than the embedding of {cfg.source} ({rows} '
                                'rows)', 'build the graph with the backbone vocabulary (compiler.tokens)')
        head = model.get_output_embeddings() if info(cfg.source, cfg.revision).causal else None
        if head is not None and getattr(head, 'bias', None) is not None:
            raise BackboneError(f'the output head of {cfg.source} has a bias, which memspec\'s head does not add',
                                'use another base model')
        self.rows = rows
        self.model = with_lora(model, cfg.lora) if cfg.lora is not None else model
        self.new_tokens = torch.nn.Parameter(torch.empty(vocab - rows, int(model.config.hidden_size))
                                             .normal_(std=0.02)) if vocab > rows else None
        self.register_state_dict_post_hook(_drop_frozen_base)
        self.register_load_state_dict_post_hook(_allow_missing_base)

    # --- the Stack interface -------------------------------------------------------------------------------------

    def body_owner(self) -> BackboneModule:
        return self.shared if self.shared is not None else self

    def hf(self):
        """The transformers model (a peft model's base, whose layers hold the adapters)."""
        m = self.model
        return m.get_base_model() if self.cfg.lora is not None else m

    @property
    def layers(self):
        """The transformer blocks, in order (what FSDP wraps one by one)."""
        owner = self.body_owner()
        n = int(owner.hf().config.num_hidden_layers)
        for mod in owner.hf().modules():
            if isinstance(mod, nn.ModuleList) and len(mod) == n:
                return mod
        raise BackboneError(f'{self.cfg.source}: no list of {n} blocks found', 'use another base model')

    def embedding(self, tokens):
        owner = self.body_owner()
        emb = owner.hf().get_input_embeddings()
        if owner.new_tokens is None:
            return emb(tokens).float()
        old = emb(tokens.clamp(max=owner.rows - 1)).float()
        new = torch.nn.functional.embedding((tokens - owner.rows).clamp(min=0), owner.new_tokens)
        return torch.where((tokens >= owner.rows)[..., None], new, old)

    def forward(self, tokens=None, *, embeds=None, key_mask=None, positions=None, keep_last=None, cache=None):
        """Final hidden states [B, T, d] (fp32) of tokens [B, T] or input embeddings [B, T, d]; key_mask [B, T] True =
        real; positions default to the index among real tokens, as in compiler.blocks.Stack. cache: a BackboneCache
        (incremental decoding: x holds the new positions, key_mask covers the cached ones and the new ones)."""
        x = self.embedding(tokens) if embeds is None else embeds
        b, t = x.shape[:2]
        past = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(past, past + t, device=x.device).expand(b, -1) if key_mask is None else \
                (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        owner = self.body_owner()
        hf = owner.hf()
        body = hf.base_model if hf.base_model is not hf else hf
        dtype = hf.get_input_embeddings().weight.dtype
        mask = None if key_mask is None else key_mask.to(torch.long)
        if cache is not None and mask is None and past:
            mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        with owner.adapter(enabled=self.shared is None):
            out = body(inputs_embeds=x.to(dtype), attention_mask=mask, position_ids=positions,
                       cache=None if cache is None else cache.hf, use_cache=cache is not None)
        if cache is not None:
            cache.length += t
        h = out.last_hidden_state
        if keep_last is not None:
            h = h[:, -keep_last:]
        return h.float()

    def adapter(self, enabled: bool):
        """A context in which the LoRA adapter is on (enabled) or off."""
        import contextlib
        if self.cfg.lora is None or enabled:
            return contextlib.nullcontext()
        return self.model.disable_adapter()

    # --- parameter groups (Stage.freeze, the cost model, checkpoints) ---------------------------------------------

    def members(self, part: str = '') -> list:
        """(name relative to this module, parameter) of a part ('' = all; PARTS; 'layers.I' or 'layers.I-J')."""
        if self.shared is not None:
            return []
        params = list(self.named_parameters())
        if part == '':
            return params
        if part in ('base', 'lora'):
            return [(n, p) for n, p in params if bool(ADAPTER.search(n)) == (part == 'lora')]
        if part == 'new_tokens':
            return [(n, p) for n, p in params if n == 'new_tokens']
        blocks = {id(p): i for i, block in enumerate(self.layers) for p in block.parameters()}
        hf = self.hf()
        emb = id(hf.get_input_embeddings().weight)
        out_emb = hf.get_output_embeddings() if info(self.cfg.source, self.cfg.revision).causal else None
        head = id(out_emb.weight) if out_emb is not None and out_emb.weight is not hf.get_input_embeddings().weight \
            else None
        m = LAYER_RANGE.match(part)
        if m:
            lo, hi = int(m[1]), int(m[2] or m[1])
            return [(n, p) for n, p in params if lo <= blocks.get(id(p), -1) <= hi]
        base = [(n, p) for n, p in params if not ADAPTER.search(n) and n != 'new_tokens']
        pick = {'layers': lambda p: id(p) in blocks, 'embedding': lambda p: id(p) == emb,
                'head': lambda p: id(p) == head,
                'other': lambda p: id(p) not in blocks and id(p) not in (emb, head)}[part]
        return [(n, p) for n, p in (params if part == 'layers' else base) if pick(p)]

    def stored(self, name: str) -> bool:
        """Does the state dict hold this parameter (relative name)? The base only when it trains."""
        return self.cfg.train_base or name == 'new_tokens' or bool(ADAPTER.search(name))


def save_adapter(mod: BackboneModule, folder) -> None:
    """The backbone's LoRA adapter as peft writes it (adapter_config.json, adapter_model.safetensors), naming the
    base by source and revision: PeftModel.from_pretrained(<the base model>, folder) gives the backbone's logits
    over the base's vocabulary (new embedding rows are memspec's: model.safetensors holds them)."""
    folder = Path(folder)
    mod.model.save_pretrained(folder)
    cfg_path = folder / 'adapter_config.json'
    cfg = json.loads(cfg_path.read_text())
    cfg.update(base_model_name_or_path=mod.cfg.source, revision=mod.cfg.revision)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + '\n')


class BackboneCache:
    """Keys and values of a backbone's layers for incremental decoding (transformers' DynamicCache, which grows as
    positions arrive), with the interface of compiler.blocks.KVCache: length, capacity, reset(), nbytes."""

    def __init__(self, module: BackboneModule, capacity: int):
        self.config = module.body_owner().hf().config
        self.capacity = capacity
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache
        self.hf, self.length = DynamicCache(config=self.config), 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.hf.layers
                   for t in (getattr(layer, 'keys', None), getattr(layer, 'values', None)) if t is not None)


def _drop_frozen_base(module, state, prefix, local_metadata):
    for key in [k for k in state if k.startswith(prefix)]:
        if not module.stored(key[len(prefix):]):
            del state[key]


def _allow_missing_base(module, incompatible):
    """The base is loaded from its source, not from the checkpoint: its keys may be missing. The hook sees the keys
    of the whole load; a key is this module's when it ends in one of its unstored names (all start 'model.', which no
    memspec module has)."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]  # tied weights under both names
    unstored = {n for n in names + [n for n, _ in module.named_buffers()] if not module.stored(n)}
    for key in list(incompatible.missing_keys):
        parts = key.split('.')
        if any('.'.join(parts[i:]) in unstored for i in range(len(parts))):
            incompatible.missing_keys.remove(key)


def params(b, role_prefix: str, vocab: int) -> dict[str, int]:
    """Parameter counts of a backbone's groups, from the model built on the meta device: embedding, layers, other,
    head (untied only), new_tokens, lora; keys prefixed with `role_prefix` ('encoder.')."""
    mod = meta_module(b, vocab)
    out = {}
    for part in GROUPS:
        # a partition: the layers' adapters count under lora only
        n = sum(p.numel() for name, p in mod.members(part) if part != 'layers' or not ADAPTER.search(name))
        if n:
            out[role_prefix + part] = n
    return out


@functools.cache
def meta_module(b, vocab: int) -> BackboneModule:
    """A BackboneModule on the meta device (shapes only): cached per (Backbone, vocabulary)."""
    with torch.device('meta'):
        return BackboneModule(b, vocab)


@functools.cache
def _block_matmul_params(b) -> int:
    """Weights of one block that multiply every position (matrices: linear layers, GPT-2's Conv1D, LoRA's A and B;
    the blocks of a model are alike)."""
    with torch.device('meta'):
        mod = BackboneModule(b, embedding_rows(b.source, b.revision))
    return sum(p.numel() for p in mod.layers[0].parameters() if p.dim() == 2)


def block_flops(b, t: int, attention: bool = True) -> float:
    """Forward FLOPs of one block over t positions: 2 per matrix weight and position, plus attention scores and the
    weighted sum (a causal query at position i sees i + 1 keys)."""
    i = info(b.source, b.revision)
    seen = t * (t + 1) / 2 if i.causal else t * t
    return t * 2 * _block_matmul_params(b) + (2 * 2 * i.n_heads * i.head_dim * seen if attention else 0)


def kv_bytes(b, ctx: int) -> int:
    """Keys and values of every layer for `ctx` positions, in the weights' dtype."""
    i = info(b.source, b.revision)
    size = 4 if b.dtype == 'float32' else 2
    return 2 * i.n_layers * i.kv_heads * i.head_dim * ctx * size


def frozen_count(b, vocab: int, parts) -> int:
    """Parameters of a backbone in any of `parts` (relative freeze names; '' = all), each counted once."""
    mod = meta_module(b, vocab)
    seen = {}
    for part in parts:
        for _, p in mod.members(part):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog='python -m compiler.backbone', description=__doc__.splitlines()[0])
    ap.add_argument('--make-tiny', metavar='DIR', required=True,
                    help='write tiny random models of every supported architecture into DIR/<arch>')
    args = ap.parse_args(argv)
    from compiler.tiny import make_all
    for folder in make_all(args.make_tiny):
        print(folder)


if __name__ == '__main__':
    main()
