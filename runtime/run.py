"""python -m runtime.run SPEC [more.gin ...] [-b BINDING ...] [--db URL] [--resume RUN_ID]

Trains a spec's curriculum, stage by stage, and records the run with Sacred: config = the Plan + the operative
gin text + the spec hash; metrics; status; artifacts (final weights as safetensors, operative config, summary).
Run folder: <Run.out_dir>/<run id>/ with checkpoint.pt (latest, written atomically), stages/<stage>.safetensors
(weights at each stage end, what `init_from = 'run:<id>/<stage>'` reads), final.safetensors, summary.md.
"""
from __future__ import annotations

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
from compiler.model import build, parameters_of
from compiler.spec import load
from runtime import record
from store import memories
from runtime.data import Batches, prepare
from compiler.validate import meta_build
from runtime.train import Divergence, evaluate, init_component, optimizer, set_frozen, stage_loss, state_from_run


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename: a kill leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sanitize(obj):
    """Sacred config keys may not contain '.' (MongoDB): 'encoder.embedding' -> 'encoder:embedding'."""
    if isinstance(obj, dict):
        return {str(k).replace('.', ':'): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


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
        atomic_write(self.out_dir / 'checkpoint.pt', lambda p: torch.save(state, p))

    def flush_metrics(self) -> None:
        """Hand the metrics logged so far to the observers before a checkpoint is written. Sacred sends them only
        with its heartbeat (every 10 s), so a kill would lose steps the checkpoint has already passed, and a resume
        (which replays only the steps after the checkpoint) would never log them again."""
        run = self._run
        if getattr(run, '_metrics', None) is None:  # NullRun (ranks > 0)
            return
        from sacred.metrics_logger import linearize_metrics
        logged = linearize_metrics(run._metrics.get_last_metrics())
        if logged:
            for obs in run.observers:
                obs.log_metrics(logged, run.info)

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
                loss, losses, accs = stage_loss(model, stage, tokens, mask, self.ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
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
        r = self.plan.run
        if r.memory_store == 'none' or self.plan.family not in ('autoencoder', 'probe', 'memory'):
            return None
        return Path(r.memory_store or Path(r.out_dir) / 'memories.zarr')

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
        atomic_write(self.out_dir / 'checkpoint.pt', lambda p: torch.save(state, p))

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
        ck_path = runs_dir / args.resume / 'checkpoint.pt'
        if not ck_path.is_file():
            raise SpecError(f'--resume {args.resume}', f'no checkpoint at {ck_path}',
                            'give the id of a run started with this out_dir (python -m store.runs list)')
        resume = torch.load(ck_path, weights_only=False)
        if resume['spec_hash'] != spec.hash:
            raise SpecError(f'--resume {args.resume}', f"run {args.resume} was started from a different plan "
                            f"(hash {resume['spec_hash']}, this spec {spec.hash})", 'resume with the same spec files and bindings')
    data = prepare(plan, progress=rank == 0)  # bad data is bad input: refuse it before anything is recorded
    check_init_sources(plan, runs_dir, resume, data.vocab_size)
    if rank > 0:  # workers train in lockstep with rank 0 (gradients all-reduced) and record nothing
        Trainer(spec, data, runs_dir / (args.resume or '_worker'), resume, rank, world).run(NullRun())
        return
    obs = record.observer(url)
    if resume is not None and not record.run_exists(url, args.resume):
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
        out_dir = runs_dir / run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        _run.info['host'] = host_info()
        _run.info['run_dir'] = str(out_dir)
        (out_dir / 'operative.gin').write_text(spec.operative)
        if resume is not None and hasattr(obs, 'forget_after'):
            obs.forget_after(run_id, sum(s.steps for s in plan.curriculum[:resume['stage']]) + resume['step'])
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
    print(f"\nrun {holder['run_id']} COMPLETED  (plan {spec.hash})\n\n{holder['table']}\n")
    print(f"run folder   {holder['out_dir']}  (final.safetensors, stages/, summary.md)")
    print(f'database     {url}  (python -m store.runs show {holder["run_id"]})')
    if holder['memories'] is not None:
        print(f"memories     {holder['memories']}  (group {holder['run_id']}/<stage>; python -m store.analyze info)")


if __name__ == '__main__':
    main()
