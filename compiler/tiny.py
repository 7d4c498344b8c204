"""Tiny random models of every supported backbone architecture, saved with save_pretrained (weights, config and a
tokenizer with the architecture's special tokens), for the tests and the CPU versions of specs/pretrained/:

    python -m compiler.backbone --make-tiny DIR    ->  DIR/llama, DIR/qwen2, DIR/qwen3, DIR/gpt2, DIR/bert

Each is what transformers builds from a config of the real architecture (Llama-3.2's llama3 rope scaling and tied
embeddings, Qwen's spare embedding rows, GPT-2 without pad or reserved tokens, BERT's WordPiece and [MASK]); only
the sizes are small. The tokenizers are trained on a fixed text, so the same command writes the same files.
"""
from __future__ import annotations

from pathlib import Path

ARCHS = ('llama', 'qwen2', 'qwen3', 'gpt2', 'bert')
WIDTH, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 64, 2, 4, 2, 128, 512
TEXT = ('Memory models compress each chunk of text into one embedding. A decoder reads the memories of earlier chunks '
        'before the tokens of the next one. The quick brown fox jumps over the lazy dog; numbers 0 1 2 3 4 5 6 7 8 9. '
        'Pretrained language models serve as encoders or decoders, with adapters trained on a frozen base.')
SPECIALS = {  # special tokens the real tokenizers have (those memspec's token mapping looks at)
    'llama': ['<|begin_of_text|>', '<|end_of_text|>'] + [f'<|reserved_special_token_{i}|>' for i in range(4)],
    'qwen2': ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    'qwen3': ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    'gpt2': ['<|endoftext|>'],
    'bert': ['[PAD]'] + [f'[unused{i}]' for i in range(4)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]'],
}
ROLES = {  # transformers tokenizer attributes
    'llama': {'bos_token': '<|begin_of_text|>', 'eos_token': '<|end_of_text|>'},
    'qwen2': {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'},
    'qwen3': {'eos_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'},
    'gpt2': {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>', 'unk_token': '<|endoftext|>'},
    'bert': {'pad_token': '[PAD]', 'unk_token': '[UNK]', 'cls_token': '[CLS]', 'sep_token': '[SEP]',
             'mask_token': '[MASK]'},
}


def tokenizer(arch: str):
    """A small fast tokenizer of the architecture's kind: byte-level BPE (special tokens last, as in Llama-3,
    Qwen and GPT-2), or lowercase WordPiece (special tokens first, as in BERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    if arch == 'bert':
        tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        alphabet = [chr(c) for c in range(32, 127)]
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS[arch], initial_alphabet=alphabet,
                                            show_progress=False)
        tok.train_from_iterator([TEXT], trainer)
        return tok
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[arch]])
    return tok


def model_config(arch: str, vocab: int):
    import transformers
    common = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                  max_position_embeddings=POSITIONS)
    if arch == 'llama':  # Llama-3.2-1B's kind: GQA, llama3 rope scaling, tied embeddings
        return transformers.LlamaConfig(**common, vocab_size=vocab, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                                        tie_word_embeddings=True, bos_token_id=vocab - 6, eos_token_id=vocab - 5,
                                        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0,
                                                         'factor': 32.0, 'low_freq_factor': 1.0,
                                                         'high_freq_factor': 4.0,
                                                         'original_max_position_embeddings': 64})
    if arch in ('qwen2', 'qwen3'):  # spare embedding rows beyond the tokenizer, as the real ones have
        cls = transformers.Qwen2Config if arch == 'qwen2' else transformers.Qwen3Config
        extra = {'head_dim': WIDTH // HEADS} if arch == 'qwen3' else {}
        return cls(**common, **extra, vocab_size=vocab + 16, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                   rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0})
    if arch == 'gpt2':
        return transformers.GPT2Config(vocab_size=vocab, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
                                       n_positions=POSITIONS, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    return transformers.BertConfig(**common, vocab_size=vocab)


def make(folder, arch: str, seed: int = 0) -> Path:
    """Write the tiny `arch` model and its tokenizer into `folder` (created); returns the folder."""
    import torch
    import transformers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(arch)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    cfg = model_config(arch, vocab)
    torch.manual_seed(seed)
    model = transformers.BertModel(cfg) if arch == 'bert' else transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **ROLES[arch]).save_pretrained(folder)
    return folder


def make_all(folder) -> list[Path]:
    return [make(Path(folder) / arch, arch) for arch in ARCHS]
