"""Loading a recorded model: the one path from files on disk to a graph holding its weights.

    plan_from_dict(d)          a recorded or exported plan, checked like a spec (compiler.validate)
    vocabulary(path)           a run's tokenizer.json and its special ids
    read_weights(path, ...)    safetensors weights, checked against a recorded sha256 and against the graph's names and
                               shapes (read from the file's header) before a byte of the model is allocated
    load(plan, weights, ...)   -> Loaded(plan, model in eval mode, vocabulary); Loaded.encode and Loaded.read_out
                               are what store.analyze asks of a model (the store never runs one itself)
    from_pretrained(folder)    the model of a folder `python -m store.export` wrote

Every caller that loads a model goes through `load`: runtime.generate, runtime.evaluate and the lm-eval adapter (via
store.runref.load_run, which finds a run's files), store.analyze (the weights of a stage's memories), store.export
and from_pretrained. Everything read here is user input: a damaged, foreign or hostile file (a config.json whose
vocabulary would allocate 10^11 rows, a weights name that leaves the folder, a plan that fails Plan.from_dict or
the validator, weights of other shapes, a changed sha256) is one UserError naming the file and the fix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compiler import plan as P
from compiler.digest import sha256_file
from compiler.errors import UserError

SPECIAL_TOKENS = ('<pad>', '<eod>', '<blank>', '<copy>')
MAX_VOCAB = 1 << 24  # a vocabulary row count beyond any tokenizer: refused before anything is allocated
EXPORT_FORMAT, EXPORT_VERSIONS = 'memspec-export', (1,)  # the config.json of a folder store/export.py wrote


@dataclass
class Vocabulary:
    """A tokenizer and its special ids, without the data: what generation needs of a run (its run folder holds a copy
    of the tokenizer, so no data cache is rebuilt, which hub data would need the network for)."""
    tokenizer: object  # tokenizers.Tokenizer
    pad_id: int
    eod_id: int
    blank_id: int
    copy_id: int
    vocab_size: int

    @property
    def special_ids(self) -> dict[str, int]:
        return {'<pad>': self.pad_id, '<eod>': self.eod_id, '<blank>': self.blank_id, '<copy>': self.copy_id}


def special_ids(tok) -> dict[str, int | None]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def vocabulary(path: Path, plan: P.Plan | None = None) -> Vocabulary:
    """The Vocabulary of a tokenizer.json that runtime.data.prepare wrote (a run folder's copy). A plan with backbones
    has its special ids in the backbone's vocabulary (compiler.tokens), not as added tokens."""
    from tokenizers import Tokenizer
    fix = 'restore the run folder, or delete its tokenizer.json to rebuild it from the data cache'
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (a damaged or foreign file)
        raise UserError(str(path), f'cannot load the tokenizer: {_first_line(e)}', fix)
    tok.encode_special_tokens = True  # as prepare() uses it: a literal "<pad>" is ordinary text
    from compiler.tokens import plan_tokens
    mapped = None if plan is None else plan_tokens(plan)
    if mapped is not None:
        ids = mapped.ids
        return Vocabulary(tok, ids['<pad>'], ids['<eod>'], ids['<blank>'], ids['<copy>'], mapped.vocab)
    ids = special_ids(tok)
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise UserError(str(path), f"not a memspec tokenizer: it lacks {', '.join(missing)}", fix)
    return Vocabulary(tok, ids['<pad>'], ids['<eod>'], ids['<blank>'], ids['<copy>'],
                      tok.get_vocab_size(with_added_tokens=True))


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def plan_from_dict(d, where: str, fix: str) -> P.Plan:
    """A plan recorded as a dict (a run's Sacred config, an export's config.json), checked as a spec is: it comes
    from a file anyone can edit, and a plan too large to build is refused before any module exists."""
    from compiler import validate
    try:
        plan = P.Plan.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError, P.PlanError) as e:
        raise UserError(where, f'the recorded plan is not a plan this code reads ({type(e).__name__}: '
                        f'{_first_line(e)})', fix) from None
    try:
        validate.check(plan, lambda owner, name: where)
    except UserError as e:
        raise UserError(where, f'the recorded plan does not validate: {e.what}', fix) from None
    return plan


def inside(folder: Path, name, where: str, fix: str) -> Path:
    """A file name read from a file (config.json's weights name): a plain name of a file in `folder`, never a path
    that leaves it."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in ('.', '..'):
        raise UserError(where, f'the file name {name!r} is not a plain file name in {folder}', fix)
    return folder / name


def header_shapes(path: Path, where: str, fix: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of the tensors of a safetensors file, from its header alone (nothing is read into memory)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001  (SafetensorError: header too small, file not fully covered, ...)
        raise UserError(where, f'cannot read the weights {path}: {_first_line(e)}',
                        f'the file is damaged or not a safetensors file: {fix}') from None


def check_fits(plan: P.Plan, vocab: int, shapes: dict, path: Path, where: str, fix: str) -> None:
    """The weights' names and shapes are those of the plan's graph (built on the meta device: nothing allocated)."""
    from compiler.model import meta_build
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= MAX_VOCAB:
        raise UserError(where, f'vocabulary size {vocab!r} is not a number of tokens in 1..{MAX_VOCAB}', fix)
    want = {k: tuple(v.shape) for k, v in meta_build(plan, vocab).state_dict().items()}
    missing, extra = sorted(want.keys() - shapes.keys()), sorted(shapes.keys() - want.keys())
    wrong = [k for k in sorted(want.keys() & shapes.keys()) if want[k] != shapes[k]]
    if missing or extra or wrong:
        what = '; '.join(x for x in (
            f"missing {', '.join(missing[:3])}" + (' ...' if len(missing) > 3 else '') if missing else '',
            f"unexpected {', '.join(extra[:3])}" + (' ...' if len(extra) > 3 else '') if extra else '',
            f'{wrong[0]} is {list(shapes[wrong[0]])}, the graph has {list(want[wrong[0]])}' if wrong else '') if x)
        raise UserError(where, f"the weights {path} do not fit the '{plan.family}' graph of the plan "
                        f'(vocabulary {vocab}): {what}', fix)


def read_weights(path: Path, where: str, fix: str, sha256: str | None = None) -> dict:
    """A safetensors state dict; `sha256`: the digest recorded when the file was written (None: not recorded)."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise UserError(where, f'no weights at {path}', fix)
    if sha256 and sha256_file(path) != sha256:
        raise UserError(where, f'{path} is not the file that was recorded (its sha256 differs from the recorded '
                        f'{sha256[:16]}...)', 'restore the file from a backup, or rerun the run (or export it again)')
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(where, f'cannot read the weights {path}: {_first_line(e)}', fix) from None


@dataclass
class Loaded:
    """A recorded model: its plan, the graph with its weights (eval mode) and, when its tokenizer was loaded too,
    its vocabulary."""
    plan: P.Plan
    model: object  # compiler.model.Graph
    vocab: Vocabulary | None
    weights: Path
    where: str
    folder: object = None  # store.layout.RunFolder, when the model is a run's (store.runref.load_run)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, tokens, key_mask=None, batch: int = 1024):
        """Memories [M, d] on the CPU of chunks [M, L] (Graph.encode), in micro-batches, without gradients."""
        import torch
        with torch.no_grad():
            return torch.cat([self.model.encode(tokens[i:i + batch].to(self.device),
                                                None if key_mask is None else key_mask[i:i + batch].to(self.device))
                              .cpu() for i in range(0, len(tokens), batch)])

    def read_out(self, memories, tokens, key_mask, pad: int, blank: int, via: str):
        """(logits [M, L, vocab], labels [M, L]) of stored memories [M, d] decoded as the graph's training reads a
        memory (Graph.read_out; `via`: 'decoder', 'ae_decoder' or 'blank_copy'), on the model's device."""
        from compiler.objectives import SpecialIds
        dev = self.device
        return self.model.read_out(memories.to(dev), tokens.to(dev), key_mask.to(dev), SpecialIds(pad, blank, 0), via)


def load(plan: P.Plan, weights: Path, *, where: str, fix: str, vocab_size: int | None = None,
         sha256: str | None = None, tokenizer=None, device: str = 'cpu') -> Loaded:
    """The graph of `plan` holding the weights file; the vocabulary size comes from `tokenizer` (a tokenizer.json or
    a Vocabulary already read) unless given. Shapes are checked against the file's header before the graph is
    built, so a size that does not fit allocates nothing."""
    from compiler.model import build
    vocab = vocabulary(Path(tokenizer), plan) if isinstance(tokenizer, (str, Path)) else tokenizer  # or prepare's
    size = vocab_size if vocab_size is not None else vocab.vocab_size if vocab is not None else None
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(where, f'no weights at {weights}', fix)
    check_fits(plan, size, header_shapes(weights, where, fix), weights, where, fix)
    state = read_weights(weights, where, fix, sha256)
    model = build(plan, size)
    model.load_state_dict(state)  # names and shapes checked above
    return Loaded(plan, model.to(device).eval(), vocab, weights, where)


def read_export_config(folder: Path, where: str, fix: str) -> dict:
    try:
        cfg = json.loads((folder / 'config.json').read_text())
    except FileNotFoundError:
        raise UserError(where, f'no config.json in {folder}: not a folder python -m store.export wrote', fix) from None
    except (OSError, ValueError) as e:
        raise UserError(where, f'config.json cannot be read: {e}', fix) from None
    if not isinstance(cfg, dict) or cfg.get('format') != EXPORT_FORMAT or cfg.get('version') not in EXPORT_VERSIONS:
        got = (cfg.get('format'), cfg.get('version')) if isinstance(cfg, dict) else type(cfg).__name__
        raise UserError(where, f"config.json is not a memspec export of a version this code reads ({got}; this code "
                        f"reads {EXPORT_FORMAT!r} versions {', '.join(map(str, EXPORT_VERSIONS))})", fix)
    if not isinstance(cfg.get('plan'), dict) or not isinstance(cfg.get('weights'), dict):
        raise UserError(where, 'config.json lacks its plan or weights entry', fix)
    return cfg


def check_bases(recorded: dict, plan: P.Plan, where: str) -> None:
    """The pretrained bases of an export's backbones are the files its run trained on (the sha256 of every weight
    file, as the run recorded them): adapters on other weights would compute something else without a word."""
    from compiler.backbone import identity
    from compiler.hub import BackboneError
    from compiler.tokens import backbones
    for role, b in backbones(plan):
        want = (recorded.get(role) or {}).get('sha256') if isinstance(recorded, dict) else None
        if not want:
            continue
        try:
            have = identity(b)['sha256']
        except BackboneError as e:
            raise UserError(where, f'the {role} base model: {e.what}', e.fix) from None
        if have != want:
            raise UserError(where, f'the {role} base model {b.source} is not the one the run trained on (the sha256 of '
                            f'its weight files differs from config.json\'s)',
                            f'use the recorded revision of {b.source} (config.json: backbones.{role})')


def from_pretrained(folder):
    """The model of a folder `python -m store.export` wrote, without the run database or the run folder: the plan in
    its config.json builds the graph (compiler only), model.safetensors (checked against the sha256 recorded beside
    it) fills it. Returned in eval mode, with `.plan` (the Plan) and `.export` (the config.json) attached."""
    folder = Path(folder)
    where = f'from_pretrained({str(folder)!r})'
    fix = 'export the run with python -m store.export RUN OUT and load OUT'
    cfg = read_export_config(folder, where, fix)
    plan = plan_from_dict(cfg['plan'], f'{where}: config.json', fix)
    weights = inside(folder, cfg['weights'].get('file'), f'{where}: config.json', fix)
    sha = cfg['weights'].get('sha256')
    check_bases(cfg.get('backbones') or {}, plan, where)
    loaded = load(plan, weights, where=where, fix=fix, vocab_size=cfg.get('vocab_size'),
                  sha256=sha if isinstance(sha, str) else None)
    model = loaded.model
    model.plan, model.export = plan, cfg
    return model
