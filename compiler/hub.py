"""Where a pretrained backbone's files are and what its config says, without building anything: a local folder or
the local Hugging Face cache (never a download), transformers' config of it, and the shape the plan needs (Info).
Imports nothing of memspec, so compiler.plan can read a Backbone's width from here."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$')
LAYER_RANGE = re.compile(r'^layers\.(\d+)(?:-(\d+))?$')  # a block or a range of blocks of a stack: 'layers.0-7'


class BackboneError(Exception):
    """A Backbone that cannot be used; the validator names the binding (compiler.validate)."""

    def __init__(self, what: str, fix: str, field: str = 'source'):
        super().__init__(what)
        self.what, self.fix, self.field = what, fix, field


def fetch_command(source: str, revision: str) -> str:
    return f'hf download {source} --revision {revision}  (or: huggingface-cli download {source} --revision {revision})'


@functools.cache
def resolve(source: str, revision: str) -> Path:
    """The folder holding the model's config.json: a local folder, or the snapshot in the local Hugging Face cache.
    Never downloads."""
    if not source:
        raise BackboneError('Backbone.source is not set',
                            "bind it to a hub id (e.g. 'meta-llama/Llama-3.2-1B') or a folder save_pretrained wrote")
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / 'config.json').is_file():
            raise BackboneError(f'{source} has no config.json: not a folder save_pretrained wrote',
                                'point Backbone.source at a model folder or a hub id')
        return p.resolve()
    if source.startswith(('/', '.', '~')) or not HUB_ID.match(source):
        raise BackboneError(f"no model folder at '{source}'",
                            'make it (python -m compiler.backbone --make-tiny DIR for tiny test models) or use a '
                            "hub id such as 'Qwen/Qwen3-0.6B'")
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001  (LocalEntryNotFoundError, a revision not in the cache, a damaged cache)
        raise BackboneError(f"'{source}' (revision '{revision}') is not in the local Hugging Face cache, and memspec "
                            'never downloads', f'fetch it once: {fetch_command(source, revision)}')
    if not (folder / 'config.json').is_file():
        raise BackboneError(f"the cached '{source}' has no config.json",
                            f'fetch it again: {fetch_command(source, revision)}')
    return folder


def weight_files(folder: Path, source: str, revision: str) -> list[Path]:
    """The model's *.safetensors files (shards included). Pickle files (*.bin) are refused: never unpickled."""
    files = sorted(folder.glob('*.safetensors'))
    if not files:
        raise BackboneError(f'{source} has no *.safetensors weights in {folder} (memspec reads no pickle files)',
                            f'fetch the weights: {fetch_command(source, revision)}' if folder.name != source else
                            'save the model with save_pretrained (safetensors is its default)')
    return files


@functools.cache
def config(source: str, revision: str):
    """The transformers config of a backbone, from its config.json alone (no code from the checkpoint)."""
    import transformers
    folder = resolve(source, revision)
    try:
        cfg = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        raise BackboneError(f'transformers cannot read the config of {source}: {str(e).splitlines()[0]}',
                            'use a model whose architecture transformers ships (trust_remote_code is refused)')
    for attr in ('final_logit_softcapping', 'logit_scale'):
        if getattr(cfg, attr, None) not in (None, 1.0):
            raise BackboneError(f'{source} scales its logits ({attr} = {getattr(cfg, attr)}), which the head memspec '
                                'computes from the output embedding does not reproduce', 'use another base model')
    return cfg


@dataclass(frozen=True)
class Info:
    """What the plan needs of a backbone, from its config."""
    folder: str
    model_type: str
    causal: bool
    d_model: int
    n_layers: int
    context: int | None
    ffn: int  # MLP width
    n_heads: int
    kv_heads: int
    head_dim: int


def is_causal(cfg) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return bool(getattr(cfg, 'is_decoder', False)) or cfg.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@functools.cache
def info(source: str, revision: str) -> Info:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
    cfg = config(source, revision)
    causal = is_causal(cfg)
    if cfg.model_type not in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if causal else MODEL_MAPPING_NAMES) \
            or getattr(cfg, 'is_encoder_decoder', False):
        raise BackboneError(f"{source} is a '{cfg.model_type}' model, which is neither a causal LM nor an encoder "
                            'transformers builds with its Auto classes', 'use a causal LM or a BERT-style encoder')
    d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    return Info(str(resolve(source, revision)), cfg.model_type, causal, d, int(cfg.num_hidden_layers),
                getattr(cfg, 'max_position_embeddings', None),
                int(getattr(cfg, 'intermediate_size', None) or getattr(cfg, 'n_inner', None) or 4 * d), heads,
                int(getattr(cfg, 'num_key_value_heads', None) or heads),
                int(getattr(cfg, 'head_dim', None) or d // heads))


@functools.cache
def embedding_rows(source: str, revision: str) -> int:
    """Rows of the model's input embedding (its config built on the meta device)."""
    import torch
    import transformers
    cls = transformers.AutoModelForCausalLM if info(source, revision).causal else transformers.AutoModel
    with torch.device('meta'):
        return cls.from_config(config(source, revision)).get_input_embeddings().num_embeddings


