"""Checkpoints, and the stage weights of other runs that Stage.init_from starts a component from.

checkpoint.pt is a dict of tensors and plain values (data position, RNG state, schedule, loss scale, the stage and
step, the stage-end summary, the plan hash, and the manifest of the sharded checkpoint that holds the model and
optimizer state: checkpoint.shards/<name>/, each file with its sha256, runtime/sharded.py), written with torch.save
and read back with torch.load(weights_only=True), which refuses anything but tensors and plain containers: a crafted
checkpoint cannot run code when it is loaded (its sha256 file would not stop that: whoever can write one can write
both; the shards are safetensors). It is written atomically (store/files.py), after the shards, with its sha256 in
checkpoint.pt.sha256 beside it, checked on resume: its rename commits the resume point. A checkpoint.pt of a memspec
before sharded checkpoints (the model and optimizer state inside it) is still read.
"""
from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from compiler import plan as P
from compiler.digest import sha256_file
from compiler.errors import UserError
from compiler.families import block_range
from compiler.llama import check_llama, check_llama_config, load_llama, read_llama
from compiler.model import Graph, build, meta_build, parameters_of
from store import files
from store.layout import RunFolder

_digests: dict[str, str] = {}  # checkpoint path -> sha256 of what this process wrote or verified there


def restart_fix(path: Path, run_id: str) -> str:
    """What to do about a damaged checkpoint of run `run_id`."""
    return (f'restore {path.name} from a backup, or delete {path} and {_sidecar(path).name} to start run {run_id} '
            'again from its first step (same id and record), or start a new run')


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + '.sha256')


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save(state) to `path` atomically, and its sha256 to `path`.sha256. The digest file is replaced first
    and also names the digest of the checkpoint being replaced, so a kill between the two renames leaves a pair that
    still verifies (the old checkpoint, listed as previous)."""
    side, new = _sidecar(path), []

    def write(tmp):
        torch.save(state, tmp)
        new.append(sha256_file(tmp))
        old = _digests.get(str(path)) or (sha256_file(path) if path.is_file() else None)
        text = f'{new[0]}  {path.name}\n' + (f'# previous {old}\n' if old and old != new[0] else '')
        files.atomic_write(side, lambda p: Path(p).write_text(text))

    files.atomic_write(path, write)
    _digests[str(path)] = new[0]


CHECKPOINT_KEYS = {'optimizer', 'scheduler', 'data', 'stage', 'step', 'spec_hash', 'rng', 'summary'}


def load_checkpoint(path: Path, where: str, run_id: str) -> dict:
    """A checkpoint for --resume, verified against its sha256 file: a damaged one is a bad resume target (exit 2).
    The shards it names are verified by runtime.sharded.verify."""
    side = _sidecar(path)
    fix = restart_fix(path, run_id)
    if side.is_file():
        digest = sha256_file(path)
        known = [w for w in side.read_text().split() if len(w) == 64]
        if digest not in known:
            raise UserError(where, f'the checkpoint {path} is damaged: its sha256 {digest[:16]}... '
                                   f'is not the one in {side.name}', fix)
        _digests[str(path)] = digest
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files: the error says more
            warnings.simplefilter('ignore')
            state = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: unpickling fails in many ways)
        if isinstance(e, pickle.UnpicklingError) and 'Weights only load failed' in str(e):
            raise UserError(where, f'the checkpoint {path} holds objects other than tensors and plain values, which '
                                   'memspec never writes; it was not loaded (loading it could run code)',
                            f'delete {path} and {side.name} to start run {run_id} again from its first step, or '
                            'start a new run; do not resume from checkpoints of unknown origin')
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise UserError(where, f'cannot read the checkpoint {path}: {type(e).__name__}: {first}', fix)
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if not missing and not {'shards', 'model'} & set(state):  # sharded, or the whole model (before sharding)
        missing = ['shards']
    if missing:
        raise UserError(where, f"{path} is not a memspec checkpoint (it lacks {', '.join(missing)})", fix)
    return state


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes a kill interrupted (.checkpoint.pt.XXXX and the like: atomic_write's
    temporaries are the only hidden files of a run folder)."""
    for p in list(run_dir.glob('.*')) + list(run_dir.glob('stages/.*')):
        if p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir() and p.name.startswith('.checkpoint.shards.'):  # shards a kill left unfinished
            shutil.rmtree(p, ignore_errors=True)



# ------------------------------------------------------------------------------------------------ init_from sources

def run_source(runs_dir, source: str) -> tuple[Path, str, str, str]:
    """'run:<id>/<stage>[:<component>]' -> (the stage weights file, run id, stage, source component or ''); a source
    that names no finished stage of exactly one run is a UserError."""
    ref, _, src_comp = source[len('run:'):].partition(':')
    run_id, stage = ref.split('/', 1)
    where = f"init_from '{source}'"
    # an id or <id>-<key>, never a path; an id several runs share (different databases) is refused
    folder = RunFolder.find(runs_dir, run_id, where, f"as in 'run:<id>-<key>/{stage}'")
    path = folder.stage_weights(stage) if folder is not None else Path(runs_dir) / run_id / 'stages' / f'{stage}.*'
    if folder is None or '/' in stage or stage.startswith('.') or not path.is_file():
        raise UserError(where, f'no stage checkpoint at {path}',
                        'give the id of a finished run and one of its stage names (python -m store.runs list)')
    return path, run_id, stage, src_comp


def state_from_run(runs_dir, source: str, model: Graph, component: str) -> dict[str, torch.Tensor]:
    """'run:<id>/<stage>[:<source component>]' -> {our parameter name: tensor} for `component`. The source component
    defaults to the same name; naming it lets a probe's encoder start from a causal LM's decoder
    ('run:3/clm:decoder'). Works on a meta-device model, so bad sources are refused before a run starts."""
    path, run_id, stage, src_comp = run_source(runs_dir, source)
    src_comp = src_comp or component
    where = f"init_from '{source}'"
    stored = set(model.state_dict())  # a backbone's frozen base is not in run checkpoints: it comes from its source
    own = {n: p for n, p in parameters_of(model, component) if n in stored}
    out = {}
    try:
        f = safe_open(str(path), 'pt')
    except Exception as e:  # noqa: BLE001  (SafetensorError: a truncated or foreign file)
        text = str(e).strip()
        raise UserError(where, f"cannot read {path}: {text.splitlines()[0] if text else type(e).__name__}",
                        'the file is damaged: rerun the source run (or its stage) to rewrite it')
    with f:
        keys = set(f.keys())
        for name, p in own.items():
            key = source_name(name, component, src_comp)
            if key not in keys:
                raise UserError(where, f"run {run_id} stage {stage} has no '{key}' for '{name}'",
                                'initialise from a run whose component has the same structure (depth, kind)')
            t = f.get_tensor(key)
            if t.shape != p.shape:
                raise UserError(where, f"'{key}' is {tuple(t.shape)} in run {run_id} but '{name}' is {tuple(p.shape)}",
                                'initialise from a run with the same widths, vocabulary and chunk length')
            out[name] = t
    return out


def source_name(name: str, component: str, src_comp: str) -> str:
    """The source checkpoint's name of our parameter `name` of `component`, read from `src_comp`: the same path under
    another component ('run:3/clm:decoder' for our encoder), and for block ranges block by block in order
    ('encoder.layers.2-3' from 'encoder.layers.0-1': our block 2 reads block 0)."""
    ours, theirs = block_range(component), block_range(src_comp)
    if ours is None and theirs is None:
        return src_comp + name[len(component):]
    if ours is None or theirs is None or ours[2] - ours[1] != theirs[2] - theirs[1]:
        raise UserError(f"init_from '{component}' <- '{src_comp}'", 'a block range reads a range of as many blocks',
                        'name block ranges of the same length on both sides')
    block, _, rest = name[len(f'{ours[0]}.layers.'):].partition('.')
    return f'{theirs[0]}.layers.{theirs[1] + int(block) - ours[1]}.{rest}'


def init_component(model: Graph, plan: P.Plan, component: str, source: str, seed: int, runs_dir) -> None:
    """Stage.init_from: 'previous' keeps the weights, 'fresh' re-initialises (seeded), 'run:<id>/<stage>[:<comp>]'
    copies from another run's stage-end checkpoint, 'llama:<path>' loads a LlamaForCausalLM checkpoint."""
    if source == 'previous':
        return
    if source.startswith('llama:'):  # a pretrained Llama-architecture LM as this stack (e.g. the decoder)
        path = source[len('llama:'):]
        check_llama_config(getattr(plan, component), path, f"init_from 'llama:{path}'")
        load_llama(getattr(model, component), read_llama(path), f"init_from 'llama:{path}'")
        return
    if source == 'fresh':
        state = dict(build(plan, model.decoder.head.out_features, seed=seed).named_parameters())
    else:
        state = state_from_run(runs_dir, source, model, component)
    with torch.no_grad():
        for name, p in parameters_of(model, component):
            if name in state:  # a backbone's frozen base is not in a run's stage weights (state_from_run)
                p.copy_(state[name])


def check_init_sources(plan, runs_dir: Path, resume: dict | None, vocab: int) -> None:
    """The init_from sources of the stages still to run must exist (and Llama checkpoints fit) before anything is
    recorded: a bad source is a bad spec (exit 2), not a FAILED run that leaves a half-written run folder behind."""
    first = 0 if resume is None else resume['stage'] + (resume['optimizer'] is not None)
    for stage in plan.curriculum[first:]:
        for comp, src in stage.init_from.items():
            if src.startswith('llama:'):
                check_llama_config(getattr(plan, comp), src[len('llama:'):], f"init_from '{src}'")
                check_llama(getattr(meta_build(plan, vocab), comp), read_llama(src[len('llama:'):]),
                            f"init_from '{src}'")
            if src.startswith('run:'):
                state_from_run(runs_dir, src, meta_build(plan, vocab), comp)
