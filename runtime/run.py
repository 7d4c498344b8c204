"""python -m runtime.run SPEC [more.gin ...] [-b BINDING ...] [--db URL] [--resume RUN_ID]

Trains a spec's curriculum, stage by stage, and records the run with Sacred: config = the Plan + the operative
gin text + the spec hash; metrics; status; artifacts (final weights as safetensors, operative config, summary).
Run folder: <Run.out_dir>/<run id>/ with checkpoint.pt (latest, written atomically; its sha256 in checkpoint.pt.sha256,
checked by --resume), stages/<stage>.safetensors (weights at each stage end, what `init_from = 'run:<id>/<stage>'`
reads), final.safetensors, summary.md.

Faults (tests/test_faults.py, benchmarks/reliability_suite.py): a run killed at any moment continues with --resume
to the same weights, metrics and memories as an uninterrupted one, as one record (a run killed before its first
checkpoint starts again from its first step under the same id). A write that fails mid-run (disk full, folder gone)
or a run database that stops answering stops the run with a message and exit code 1, before the next checkpoint, so
the last checkpoint is intact and --resume continues it. A damaged checkpoint is refused (exit 2).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from compiler import objectives as O
from compiler.__main__ import parser
from compiler.errors import SpecError, cli
from compiler.model import build, compile_stacks, parameters_of
from compiler.spec import load, locate
from runtime import record
from store import memories
from runtime.data import Batches, prepare
from compiler.validate import meta_build
from runtime.train import Divergence, accumulate, evaluate, init_component, optimizer, set_frozen, state_from_run


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a kill leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename == tmp:  # name the file the user knows (disk full: 'checkpoint.pt', not '.checkpoint.pt.x1y2')
            e.filename = str(path)
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


_digests: dict[str, str] = {}  # checkpoint path -> sha256 of what this process wrote or verified there


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
        atomic_write(side, lambda p: Path(p).write_text(text))

    atomic_write(path, write)
    _digests[str(path)] = new[0]


def load_checkpoint(path: Path, where: str, run_id: str) -> dict:
    """A checkpoint for --resume, verified against its sha256 file: a damaged one is a bad resume target (exit 2)."""
    side = _sidecar(path)
    fix = (f'restore {path.name} from a backup, or delete {path} and {side.name} to start run {run_id} again from its '
           'first step (same id and record), or start a new run')
    if side.is_file():
        digest = sha256_file(path)
        known = [w for w in side.read_text().split() if len(w) == 64]
        if digest not in known:
            raise SpecError(where, f'the checkpoint {path} is damaged: its sha256 {digest[:16]}... is not the one in {side.name}', fix)
        _digests[str(path)] = digest
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: unpickling fails in many ways)
        raise SpecError(where, f'cannot read the checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}', fix)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of atomic writes a kill interrupted (.checkpoint.pt.XXXX and the like)."""
    names = ('.checkpoint.pt.', '.final.safetensors.')
    for p in list(run_dir.glob('.*')) + list(run_dir.glob('stages/.*.safetensors.*')):
        if p.is_file() and (p.parent.name == 'stages' or p.name.startswith(names)):
            p.unlink(missing_ok=True)


def check_writable(folder: Path, where: str) -> None:
    """Refuse an output folder the run could not write, before anything is recorded (exit 2)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.write-test.')
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SpecError(where, f'cannot write to {folder}: {e.strerror or e}', 'choose a folder this user can write (Run.out_dir)')


def _sanitize(obj):
    """Sacred config keys may not contain '.' (MongoDB): 'encoder.embedding' -> 'encoder:embedding'."""
    if isinstance(obj, dict):
        return {str(k).replace('.', ':'): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def memory_store_path(plan) -> Path | None:
    """Where the run writes held-out memories (None: nowhere)."""
    r = plan.run
    if r.memory_store == 'none' or plan.family not in ('autoencoder', 'probe', 'memory'):
        return None
    return Path(r.memory_store or Path(r.out_dir) / 'memories.zarr')


class NullRun:
    """Stands in for Sacred's run on ranks > 0 of a distributed job: only rank 0 records and writes."""
    _id = None

    def __init__(self):
        self.info = {}

    def log_scalar(self, *args):
        pass


def distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, NCCL on GPU); (0, 1) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks in one flat buffer. Used instead of DistributedDataParallel because the
    objectives call several entry points of the model (forward, autoencode, encode), not just forward."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


class Trainer:
    def __init__(self, spec, data, out_dir: Path, resume: dict | None, rank: int = 0, world: int = 1):
        self.spec, self.plan, self.data = spec, spec.plan, data
        self.rank, self.world = rank, world
        self.ids = O.SpecialIds(pad=self.data.pad_id, blank=self.data.blank_id, copy=self.data.copy_id)
        self.vocab = self.data.vocab_size
        self.model = build(self.plan, self.vocab)
        if self.plan.run.compile:
            compile_stacks(self.model)
        self.batches = Batches(self.data.train, self.data.train_mask, self.plan.data.batch_size, self.plan.run.seed,
                               rank=rank, world=world)
        self.out_dir, self.resume = out_dir, resume
        self.summary: dict[str, dict] = {}
        self._run = None

    def checkpoint(self, stage_idx: int, step: int, opt, sched, run_id: str) -> None:
        if self.rank:
            return
        state = {'model': self.model.state_dict(), 'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(),
                 'data': self.batches.state_dict(), 'stage': stage_idx, 'step': step, 'spec_hash': self.spec.hash,
                 'rng': torch.random.get_rng_state(), 'summary': self.summary, 'run_id': run_id}
        self.flush_metrics()
        save_checkpoint(self.out_dir / 'checkpoint.pt', state)

    def flush_metrics(self) -> None:
        """Hand the metrics logged so far to the observers before a checkpoint is written. Sacred sends them only
        with its heartbeat (every 10 s), so a kill would lose steps the checkpoint has already passed, and a resume
        (which replays only the steps after the checkpoint) would never log them again."""
        run = self._run
        if getattr(run, '_metrics', None) is None:  # NullRun (ranks > 0)
            return
        from sacred.metrics_logger import linearize_metrics
        logged = linearize_metrics(run._metrics.get_last_metrics())
        for obs in run.observers:
            if logged:
                obs.log_metrics(logged, run.info)
            if hasattr(obs, 'sync'):  # every row in, or RecordingLost: the checkpoint is then not written
                obs.sync()

    def run(self, _run) -> dict:
        plan, run_id = self.plan, str(_run._id)
        self._run = _run
        torch.manual_seed(plan.run.seed)
        start_stage, start_step, ck = 0, 0, None
        if self.resume is not None:
            ck = self.resume
            self.model.load_state_dict(ck['model'])
            self.batches.load_state_dict(ck['data'])
            torch.random.set_rng_state(ck['rng'])
            start_stage, start_step, self.summary = ck['stage'], ck['step'], ck['summary']
            end = 0
            for s in plan.curriculum:  # the stages finished before the kill (the info of the new process lacks them)
                end += s.steps
                if s.name in self.summary:
                    _run.info.setdefault('stages', {})[s.name] = {'end_step': end}
        offset = sum(s.steps for s in plan.curriculum[:start_stage])
        for si in range(start_stage, len(plan.curriculum)):
            stage = plan.curriculum[si]
            # mid-stage resume restores optimizer state; a resume at a stage boundary starts the stage afresh
            resuming = ck is not None and si == start_stage and ck['optimizer'] is not None
            if not resuming:
                for comp, src in stage.init_from.items():
                    init_component(self.model, plan, comp, src, plan.run.seed + 1000 + si, self.out_dir.parent)
            params = set_frozen(self.model, stage)
            opt, sched = optimizer(params, stage)
            if resuming:
                opt.load_state_dict(ck['optimizer'])
                sched.load_state_dict(ck['scheduler'])
            self.train_stage(_run, si, stage, opt, sched, start_step if resuming else 0, offset, run_id)
            offset += stage.steps
        return self.summary

    def train_stage(self, _run, si, stage, opt, sched, step, offset, run_id):
        plan, model = self.plan, self.model
        model.train()
        tokens_per_step = plan.data.batch_size * plan.memory.chunks * plan.memory.chunk_len * len(stage.objectives)
        params = [p for g in opt.param_groups for p in g['params']]
        bar = tqdm(total=stage.steps, initial=step, desc=f'stage {si + 1}/{len(plan.curriculum)} {stage.name}',
                   dynamic_ncols=True, file=sys.stderr, mininterval=1.0, disable=self.rank > 0)
        t0, done = time.perf_counter(), 0
        while step < stage.steps:
            position, rng = self.batches.state_dict(), torch.random.get_rng_state()
            try:
                tokens, mask = next(self.batches)
                opt.zero_grad(set_to_none=True)
                loss, losses, accs = accumulate(model, stage, tokens, mask, self.ids)
                all_reduce_grads(params, self.world)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            except KeyboardInterrupt:  # Ctrl-C before the update: rewind this step's batch, leave a resume point
                bar.close()
                self.batches.load_state_dict(position)
                torch.random.set_rng_state(rng)
                self.checkpoint(si, step, opt, sched, run_id)
                raise
            except Divergence:
                bar.close()
                raise
            opt.step()
            sched.step()
            step, done = step + 1, done + 1
            gstep = offset + step
            if step % plan.run.log_every == 0 or step == stage.steps:
                logged = self.global_mean({'loss': loss, **{f'{k}.loss': v for k, v in losses.items()},
                                           **{f"{k}.{'top1_accuracy' if k == 'retrieval' else 'token_accuracy'}": v for k, v in accs.items()}})
                for k, v in logged.items():
                    _run.log_scalar(f'train/{k}', v, gstep)
                rate = done * tokens_per_step / (time.perf_counter() - t0)
                acc = sum(v for k, v in logged.items() if k.endswith('accuracy')) / len(accs)
                bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f'{acc:.3f}', tok_s=f'{rate:,.0f}', refresh=False)
            bar.update(1)
            if step % stage.eval_every == 0 or step == stage.steps:
                metrics = self.evaluate()
                for k, v in metrics.items():
                    _run.log_scalar(f'eval/{k}', v, gstep)
                if step == stage.steps:
                    self.summary[stage.name] = metrics
                    _run.info.setdefault('stages', {})[stage.name] = {'end_step': gstep}
            if step == stage.steps:
                self.stage_end(si, opt, sched, run_id)
            elif step % plan.run.checkpoint_every == 0:
                self.checkpoint(si, step, opt, sched, run_id)
        bar.close()

    def stage_end(self, si: int, opt, sched, run_id: str) -> None:
        """Weights of the finished stage (for init_from), then the resume point: the next stage's start."""
        if self.rank:
            return
        stage = self.plan.curriculum[si]
        weights = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(self.out_dir / 'stages' / f'{stage.name}.safetensors', lambda p: save_file(weights, p))
        self.write_memories(stage.name, run_id)
        if si + 1 < len(self.plan.curriculum):
            self._stage_boundary(si + 1, run_id)
        else:
            self.checkpoint(si, stage.steps, opt, sched, run_id)

    def memory_store(self) -> Path | None:
        return memory_store_path(self.plan)

    def write_memories(self, stage: str, run_id: str) -> None:
        """Memories of the held-out set -> Zarr, marked complete only when every row is in."""
        path = self.memory_store()
        if path is None:
            return
        plan, steps = self.plan, sum(s.steps for s in self.plan.curriculum[:[s.name for s in self.plan.curriculum].index(stage) + 1])
        attrs = {'spec_hash': self.spec.hash, 'step': steps, 'family': plan.family, 'encoder_d_model': plan.encoder.d_model,
                 'chunks': plan.memory.chunks, 'chunk_len': plan.memory.chunk_len, 'vocab_size': self.vocab,
                 'tokenizer_path': str((self.data.cache_path / 'tokenizer.json').resolve()),
                 'checkpoint_path': str((self.out_dir / 'stages' / f'{stage}.safetensors').resolve()),
                 'special_ids': self.data.special_ids}
        memories.write(path, run_id, stage, self.model, self.data.val, self.data.val_mask, attrs, dtype=plan.run.memory_dtype)

    def _stage_boundary(self, next_stage: int, run_id: str) -> None:
        """Checkpoint between stages: the next stage starts fresh optimizer state, so none is stored."""
        if self.rank:
            return
        state = {'model': self.model.state_dict(), 'optimizer': None, 'scheduler': None, 'data': self.batches.state_dict(),
                 'stage': next_stage, 'step': 0, 'spec_hash': self.spec.hash, 'rng': torch.random.get_rng_state(),
                 'summary': self.summary, 'run_id': run_id, 'boundary': True}
        self.flush_metrics()
        save_checkpoint(self.out_dir / 'checkpoint.pt', state)

    def global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over ranks of per-rank scalars (what a single process with the global batch would log)."""
        flat = torch.stack([v.detach().float() for v in values.values()])
        if self.world > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world
        return dict(zip(values, flat.tolist()))

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.plan, self.data.val, self.data.val_mask, self.ids, self.plan.data.batch_size,
                        self.plan.run.eval_batches, self.data.bytes_per_token.get('val'), self.vocab)


SUMMARY_COLUMNS = [('clm.ce', 'clm loss'), ('clm.token_accuracy', 'clm acc'), ('copy.token_accuracy', 'copy acc'),
                   ('blank_copy.token_accuracy', 'blank-copy acc'), ('blank_copy_ablated.token_accuracy', 'no-memory (ablated)'),
                   ('autoencode.token_accuracy', 'autoencode acc'), ('autoencode.info_proportion', 'I_e (ae)'),
                   ('clm.bits_per_byte', 'clm bpb')]


def summary_table(summary: dict[str, dict]) -> str:
    cols = [(k, name) for k, name in SUMMARY_COLUMNS if any(k in m for m in summary.values())]
    lines = ['| stage | ' + ' | '.join(n for _, n in cols) + ' |', '|---|' + '---|' * len(cols)]
    for stage, m in summary.items():
        lines.append(f'| {stage} | ' + ' | '.join(f'{m[k]:.3f}' if k in m else '-' for k, _ in cols) + ' |')
    return '\n'.join(lines)


def host_info() -> dict:
    import importlib.metadata as md
    pkgs = {p: md.version(p) for p in ('torch', 'xformers', 'gin-config', 'sacred', 'zarr', 'tokenizers', 'datasets')}
    return {'python': platform.python_version(), 'packages': pkgs, 'threads': torch.get_num_threads()}


def check_init_sources(plan, runs_dir: Path, resume: dict | None, vocab: int) -> None:
    """The init_from sources of the stages still to run must exist (and Llama checkpoints fit) before anything is
    recorded: a bad source is a bad spec (exit 2), not a FAILED run that leaves a half-written run folder behind."""
    first = 0 if resume is None else resume['stage'] + (resume['optimizer'] is not None)
    for stage in plan.curriculum[first:]:
        for comp, src in stage.init_from.items():
            if src.startswith('llama:'):
                from compiler.checkpoint import check_llama, read_llama
                check_llama(getattr(meta_build(plan, vocab), comp), read_llama(src[len('llama:'):]), f"init_from '{src}'")
            if src.startswith('run:'):
                state_from_run(runs_dir, src, meta_build(plan, vocab), comp)


@cli
def main(argv=None):
    ap = parser('python -m runtime.run', __doc__.split('\n\n')[0])
    ap.add_argument('--db', help='observer database URL (default sqlite:///<Run.out_dir>/sacred.db)')
    ap.add_argument('--resume', metavar='RUN_ID', help='continue a killed or interrupted run')
    args = ap.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    spec = load(args.specs, args.binding)
    plan = spec.plan
    rank, world = distributed()
    runs_dir = Path(plan.run.out_dir)
    url = args.db or record.default_url(plan.run.out_dir)
    resume = None
    if args.resume is not None:
        ck_path, where = runs_dir / args.resume / 'checkpoint.pt', f'--resume {args.resume}'
        if ck_path.is_file():
            resume = load_checkpoint(ck_path, where, args.resume)
            started_from = resume['spec_hash']
        else:  # killed before its first checkpoint: recorded (Sacred writes the row first), it starts again from step 0
            config = record.recorded_config(url, args.resume)  # None: no such run (an absent SQLite file stays absent)
            if config is None:
                raise SpecError(where, f'no checkpoint at {ck_path}',
                                'give the id of a run started with this out_dir (python -m store.runs list)')
            started_from = config.get('spec_hash')
        if started_from != spec.hash:
            raise SpecError(where, f"run {args.resume} was started from a different plan "
                            f"(hash {started_from}, this spec {spec.hash})", 'resume with the same spec files and bindings')
    data = prepare(plan, progress=rank == 0)  # bad data is bad input: refuse it before anything is recorded
    check_init_sources(plan, runs_dir, resume, data.vocab_size)
    if rank > 0:  # workers train in lockstep with rank 0 (gradients all-reduced) and record nothing
        Trainer(spec, data, runs_dir / (args.resume or '_worker'), resume, rank, world).run(NullRun())
        return
    check_writable(runs_dir, locate(spec.locations, plan.run, 'out_dir'))
    if memory_store_path(plan) is not None:
        check_writable(memory_store_path(plan).parent, locate(spec.locations, plan.run, 'memory_store'))
    obs = record.observer(url)
    if args.resume is not None and not record.run_exists(url, args.resume):
        raise SpecError(f'--resume {args.resume}', f'run {args.resume} is not in {url}', 'pass the --db the run was recorded in')

    from sacred import SETTINGS, Experiment
    SETTINGS.CAPTURE_MODE = 'no'  # tqdm owns the terminal; output capture would store carriage-return noise
    ex = Experiment(plan.run.name, save_git_info=False)
    ex.observers.append(obs)
    ex.add_config({'plan': _sanitize(plan.to_dict()), 'operative_gin': spec.operative, 'spec_hash': spec.hash,
                   'spec_files': spec.files, 'bindings': spec.bindings})
    holder = {}

    @ex.main
    def _main(_run):
        run_id = str(_run._id)
        holder['run_id'] = run_id
        out_dir = runs_dir / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.resume is not None:
            remove_stale_temporaries(out_dir)
        _run.info['host'] = host_info()
        _run.info['run_dir'] = str(out_dir)
        (out_dir / 'operative.gin').write_text(spec.operative)
        if args.resume is not None and hasattr(obs, 'forget_after'):  # steps after the checkpoint are replayed
            done = 0 if resume is None else sum(s.steps for s in plan.curriculum[:resume['stage']]) + resume['step']
            obs.forget_after(run_id, done)
        trainer = Trainer(spec, data, out_dir, resume, rank, world)
        holder['trainer'] = trainer
        _run.info['data'] = {'cache': str(trainer.data.cache_path), 'vocab_size': trainer.vocab,
                             'special_ids': trainer.data.special_ids, 'stats': trainer.data.stats}
        summary = trainer.run(_run)
        weights = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
        atomic_write(out_dir / 'final.safetensors', lambda p: save_file(weights, p))
        table = summary_table(summary)
        (out_dir / 'summary.md').write_text(f'# run {run_id} ({plan.run.name}, plan {spec.hash})\n\n{table}\n')
        (out_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
        for name in ('final.safetensors', 'operative.gin', 'summary.md', 'summary.json'):
            _run.add_artifact(str(out_dir / name), name)
        holder.update(run_id=run_id, out_dir=out_dir, table=table, memories=trainer.memory_store())
        last = summary[plan.curriculum[-1].name]
        return float(last.get('clm.ce', last.get('autoencode.ce', 0.0)))

    options = {'--id': args.resume} if args.resume is not None else {}
    try:
        ex.run(options=options)
    except Divergence as e:
        print(f'error: run diverged: {e}. The run is recorded as FAILED.', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the run is recorded as INTERRUPTED; continue it with --resume {holder.get('run_id', '<id>')}",
              file=sys.stderr)
        sys.exit(130)
    except (record.RecordingLost, record.sa.exc.SQLAlchemyError) as e:
        cause = e if isinstance(e, record.RecordingLost) else \
            f'the run database {record.display_url(url)} failed ({str(getattr(e, "orig", None) or e).strip().splitlines()[0]})'
        print(f'\nerror: {cause}.\n  The run stopped before its next checkpoint: everything up to its last checkpoint is '
              f'recorded and nothing after it is lost. {_continue(holder, "when the database answers again")}', file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, folder removed, I/O error: stopped before the checkpoint the write belonged to
        print(f"\nerror: cannot write {e.filename or 'a file'}: {e.strerror or e}.\n  The run stopped; its last checkpoint is "
              f"intact (written atomically). {_continue(holder, 'after freeing space or fixing the folder')}", file=sys.stderr)
        sys.exit(1)
    if getattr(obs, 'lost', None) is not None:
        print(f"\nerror: run {holder['run_id']} finished (weights and summary in {holder['out_dir']}) but the run database "
              f"{record.display_url(url)} stopped answering at the end, so its status and artifacts are not recorded.\n  "
              f"When it answers again, record them: rerun the same command with --resume {holder['run_id']}", file=sys.stderr)
        sys.exit(1)
    print(f"\nrun {holder['run_id']} COMPLETED  (plan {spec.hash})\n\n{holder['table']}\n")
    print(f"run folder   {holder['out_dir']}  (final.safetensors, stages/, summary.md)")
    print(f'database     {url}  (python -m store.runs show {holder["run_id"]})')
    if holder['memories'] is not None:
        print(f"memories     {holder['memories']}  (group {holder['run_id']}/<stage>; python -m store.analyze info)")


def _continue(holder: dict, when: str) -> str:
    if 'run_id' not in holder:
        return f'{when[0].upper()}{when[1:]}, start the run again.'
    return f"{when[0].upper()}{when[1:]}, continue it with --resume {holder['run_id']} (same spec and bindings)."


if __name__ == '__main__':
    main()
