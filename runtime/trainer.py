"""The training loop over a plan's curriculum (one stage's math is in runtime/train.py)."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from compiler import objectives as O
from compiler.errors import UserError
from compiler.families import family
from compiler.model import build, encoder_sha256
from compiler.objective_registry import objective
from runtime import checkpoint as ckpt
from runtime import distributed as D
from runtime import sharded, train
from runtime.checkpoint import init_component
from runtime.distributed import run_device
from runtime.step import TrainStep, forward_backward, grad_scaler, load_schedule, optimizer_step, set_matmul_precision
from runtime.tracking import Tracker
from runtime.train import Divergence, DivergenceWatch, optimizer, set_frozen
from store import files, memories
from store.layout import RunFolder, file_ref, memory_store


class Trainer:
    """Trains a plan's curriculum stage by stage in one run folder: checkpoints, stage-end weights, evaluation,
    memories, and the metrics it hands to Sacred and TensorBoard (runtime/tracking.py). Every step is one call of
    the TrainStep module (runtime/step.py), wrapped for Run.parallel (runtime/distributed.py). Ranks > 0 of a
    multi-process job train in lockstep, write their part of each sharded checkpoint, and record nothing."""

    def __init__(self, spec, data, out_dir: Path, resume: dict | None, rank: int = 0, world: int = 1):
        self.spec, self.plan, self.data = spec, spec.plan, data
        self.rank, self.world = rank, world
        self.ids = O.SpecialIds(pad=self.data.pad_id, blank=self.data.blank_id, copy=self.data.copy_id)
        self.vocab = self.data.vocab_size
        self.device = run_device(self.plan.run)  # refused (exit 2) by runtime.run before this when unavailable
        run = self.plan.run
        set_matmul_precision(run.precision, self.device)
        self.model = build(self.plan, self.vocab).to(self.device)  # built (seeded) on the CPU: the same weights
        self.step = TrainStep(self.model, self.ids, run.precision)
        D.prepare(self.step, run, self.device, self.plan.data.cache_dir, world)  # checkpointing, compile, FSDP
        self.scaler = grad_scaler(self.device, run.precision)
        self.final_weights: dict | None = None  # the last stage's full weights (rank 0), for final.safetensors
        self.batches = self.data.loader(self.plan.data.batch_size, self.plan.run.seed, rank=rank, world=world)
        self.out_dir, self.folder, self.resume = out_dir, RunFolder.at(out_dir), resume
        self.summary: dict[str, dict] = {}
        self._run = None
        self.tracker: Tracker | None = None

    def checkpoint(self, stage_idx: int, step: int, opt, sched, run_id: str) -> None:
        """The resume point: stage `stage_idx` at `step`; every rank calls it. The model's and optimizer's tensors go
        to a sharded checkpoint (runtime/sharded.py, each rank its part), the rest (schedule, data position, RNG,
        loss scale, summary) with the shards' manifest into checkpoint.pt, whose atomic write commits it. Between
        stages (opt None) the next stage starts with fresh optimizer state, so none is stored."""
        self.flush_metrics()
        self.stage_batches(stage_idx)  # the data position is kept with the batch size of the stage it resumes
        manifest = sharded.save(self.folder.root, self.model, opt, self.rank, self.world)
        if self.rank:
            return
        state = {'shards': manifest, 'optimizer': None if opt is None else 'shards',
                 'scheduler': None if sched is None else sched.state_dict(), 'data': self.batches.state_dict(),
                 'stage': stage_idx, 'step': step, 'spec_hash': self.spec.hash, 'rng': torch.random.get_rng_state(),
                 'summary': self.summary, 'run_id': run_id, 'scaler': self.scaler.state_dict(), 'world': self.world}
        if self.device.type == 'cuda':  # memory noise draws from the GPU's generator
            state['cuda_rng'] = torch.cuda.get_rng_state(self.device)
        if opt is None:
            state['boundary'] = True
        try:
            ckpt.save_checkpoint(self.folder.checkpoint, state)
        except BaseException:
            shutil.rmtree(self.folder.root / manifest['dir'], ignore_errors=True)  # never committed
            raise
        sharded.prune(self.folder.root, manifest)

    def restore(self, ck: dict, opt=None) -> None:
        """The model (and, mid-stage, the optimizer) of a resume point: sharded (any world size and parallel mode
        wrote it) or a checkpoint.pt of a memspec before sharded checkpoints, which held them itself (read with
        weights_only=True like the rest; not into an FSDP-sharded model)."""
        if 'shards' in ck:
            sharded.load(self.folder.root, ck['shards'], self.model, opt)
            return
        if any(hasattr(p, 'full_tensor') for p in self.model.parameters()):
            raise UserError('--resume', 'this checkpoint.pt was written before sharded checkpoints (it holds the '
                            "whole model), which an FSDP-sharded model does not read",
                            'resume it in one process (python -m runtime.run ... --resume ID): its next checkpoint '
                            'is sharded and resumes under FSDP')
        if opt is None:
            self.model.load_state_dict(ck['model'])
        else:
            opt.load_state_dict(ck['optimizer'])

    def stage_batches(self, si: int) -> None:
        """Cut the batch stream in the rows of stage `si` (Stage.batch_size, else Data.batch_size)."""
        stage = self.plan.curriculum[si]
        self.batches.resize(self.plan.batch_rows(stage), None if stage.batch_size is None else
                            f"stage '{stage.name}': Stage.batch_size = {stage.batch_size}")

    def flush_metrics(self) -> None:
        """Hand the metrics logged so far to the observers before a checkpoint is written. Sacred sends them only
        with its heartbeat (every 10 s), so a kill would lose steps the checkpoint has already passed, and a resume
        (which replays only the steps after the checkpoint) would never log them again."""
        run = self._run
        if getattr(run, '_metrics', None) is None:  # NullRun (ranks > 0)
            return
        self.tracker.flush()
        from sacred.metrics_logger import linearize_metrics
        logged = linearize_metrics(run._metrics.get_last_metrics())
        for obs in run.observers:
            if logged:
                obs.log_metrics(logged, run.info)
            if hasattr(obs, 'sync'):  # every row in, or RecordingLost: the checkpoint is then not written
                obs.sync()

    def run(self, _run) -> dict:
        """Train every stage still to run; the TensorBoard writer is closed however it ends."""
        self._run = _run
        if self.world > 1:  # rank 0 names the run folder (its id comes from the database): every rank writes there
            root = [str(self.out_dir)]
            torch.distributed.broadcast_object_list(root, src=0)
            self.out_dir, self.folder = Path(root[0]), RunFolder.at(root[0])
        resumed_at = None if self.resume is None else self.plan.stage_start(self.resume['stage']) + self.resume['step']
        self.tracker = Tracker(_run, self.folder.tensorboard if self.rank == 0 else None, resumed_at)
        try:
            return self._train(_run)
        except Exception as e:
            if self.world > 1 and D.lost_rank(e):
                raise D.RankLost(f'rank {self.rank}: {str(e).strip().splitlines()[0]}') from e
            raise
        finally:
            self.tracker.close()

    def _train(self, _run) -> dict:
        plan, run_id = self.plan, str(_run._id)
        torch.manual_seed(plan.run.seed)
        start_stage, start_step, ck = 0, 0, self.resume
        if ck is not None:
            self.resume_state(ck, _run)
            start_stage, start_step = ck['stage'], ck['step']
        offset = plan.stage_start(start_stage)
        for si in range(start_stage, len(plan.curriculum)):
            stage = plan.curriculum[si]
            # mid-stage resume restores optimizer state; a resume at a stage boundary starts the stage afresh
            resuming = ck is not None and si == start_stage and ck['optimizer'] is not None
            if not resuming:
                for comp, src in stage.init_from.items():
                    init_component(self.model, plan, comp, src, plan.run.seed + 1000 + si, self.folder.out_dir)
            self.stage_batches(si)
            params = set_frozen(self.model, stage)
            opt, sched = optimizer(params, stage)
            if resuming:
                self.restore(ck, opt)
                load_schedule(opt, sched, ck['scheduler'])
            self.train_stage(_run, si, stage, opt, sched, start_step if resuming else 0, offset, run_id)
            offset += stage.steps
        return self.summary

    def resume_state(self, ck: dict, _run) -> None:
        """Everything of a resume point but a mid-stage optimizer (read with it, once the stage built it)."""
        if ck['optimizer'] is None or 'model' in ck:  # mid-stage shards are read with the optimizer
            self.restore(ck)
        if ck.get('scaler'):
            self.scaler.load_state_dict(ck['scaler'])
        self.stage_batches(ck['stage'])
        self.batches.load_state_dict(ck['data'])
        torch.random.set_rng_state(ck['rng'])
        if 'cuda_rng' in ck and self.device.type == 'cuda':
            torch.cuda.set_rng_state(ck['cuda_rng'], self.device)
        self.summary = ck['summary']
        for s in self.plan.curriculum:  # the stages finished before the kill (the info of the new process lacks them)
            if s.name in self.summary:
                _run.info.setdefault('stages', {})[s.name] = {'end_step': self.plan.stage_end(s.name)}
                self.reference_weights(s.name)

    def train_stage(self, _run, si, stage, opt, sched, step, offset, run_id):
        plan, model = self.plan, self.model
        model.train()
        self.step.stage = stage
        wrapped = D.wrap_stage(self.step, plan.run.parallel, self.device, self.world)  # after set_frozen
        sync = D.gradient_sync(wrapped)
        tokens_per_step = plan.batch_rows(stage) * plan.memory.chunks * plan.memory.chunk_len * len(stage.objectives)
        params = [p for g in opt.param_groups for p in g['params']]
        bar = tqdm(total=stage.steps, initial=step, desc=f'stage {si + 1}/{len(plan.curriculum)} {stage.name}',
                   dynamic_ncols=True, file=sys.stderr, mininterval=1.0, disable=self.rank > 0)
        t0, done, watch = time.perf_counter(), 0, DivergenceWatch(stage)
        while step < stage.steps:
            loss, losses, accs = self.train_step(si, stage, step, opt, sched, (wrapped, sync), bar, watch, run_id)
            lr = opt.param_groups[0]['lr']  # the rate of this update (the scheduler moves it on below)
            grad_norm = optimizer_step(opt, sched, self.scaler, params)  # the norm before clipping is logged
            step, done = step + 1, done + 1
            gstep = offset + step
            if (step % plan.run.log_every == 0 or step % stage.eval_every == 0 or step == stage.steps
                    or step % plan.run.checkpoint_every == 0):  # the host reads losses only where it logs or writes
                try:
                    watch.check()
                except Divergence:
                    bar.close()
                    raise
            if step % plan.run.log_every == 0 or step == stage.steps:
                rate = done * tokens_per_step / (time.perf_counter() - t0)
                self.log_step(loss, losses, accs, grad_norm, lr, rate, gstep, bar)
            bar.update(1)
            if step == stage.steps:
                bar.close()  # what follows (evaluation, memories) shows its own progress
            self.after_step(_run, si, stage, step, offset, opt, sched, run_id)
        bar.close()

    def train_step(self, si, stage, step, opt, sched, wrapped, bar, watch, run_id):
        """Forward and backward of one batch through the (wrapped) TrainStep, gradients synchronised on its last
        micro-batch -> (loss, {kind: loss}, {kind: metric}). Ctrl-C before the update rewinds the batch and, in one
        process, leaves a resume point (ranks stopped at different points cannot write a checkpoint together: a
        multi-process job resumes from its last one)."""
        module, sync = wrapped
        position, rng = self.batches.state_dict(), torch.random.get_rng_state()
        try:
            tokens, mask = next(self.batches)
            tokens = tokens.to(self.device)  # the mask stays on the CPU: the step decides padding there
            opt.zero_grad(set_to_none=True)
            loss, losses, accs = forward_backward(module, self.step, tokens, mask, self.scaler, sync=sync)
            watch.add(loss, losses)
        except KeyboardInterrupt:
            bar.close()
            watch.check()  # never a diverged resume point
            self.batches.load_state_dict(position)
            torch.random.set_rng_state(rng)
            if self.world == 1:
                self.checkpoint(si, step, opt, sched, run_id)
            raise
        return loss, losses, accs

    def log_step(self, loss, losses, accs, grad_norm, lr, rate, gstep, bar):
        """train/ scalars (the mean over ranks): the losses, each objective's metric (ObjectiveKind.metric: train/
        <kind>.token_accuracy, train/retrieval.top1_accuracy), the gradient norm, the rate."""
        logged = self.global_mean({'loss': loss, **{f'{k}.loss': v for k, v in losses.items()},
                                   **{f'{k}.{objective(k).metric}': v for k, v in accs.items()},
                                   'grad_norm': grad_norm})
        for k, v in {**logged, 'lr': lr, 'tokens_per_s': rate}.items():
            self.tracker.scalar(f'train/{k}', v, gstep)
        acc = sum(v for k, v in logged.items() if k.endswith('accuracy')) / len(accs)
        bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f'{acc:.3f}', tok_s=f'{rate:,.0f}', refresh=False)

    def after_step(self, _run, si, stage, step, offset, opt, sched, run_id):
        """Evaluation where Stage.eval_every says, then the stage end or a checkpoint."""
        plan, gstep = self.plan, offset + step
        if step % stage.eval_every == 0 or step == stage.steps:
            with D.gathered(self.step):  # FSDP: the root unit's parameters, on every rank
                metrics = self.evaluate(f'stage {si + 1}/{len(plan.curriculum)} {stage.name}: evaluation',
                                        leave=step == stage.steps, stage=stage)  # mid-stage ones vanish under the bar
            for k, v in metrics.items():
                self.tracker.scalar(f'eval/{k}', v, gstep)
            if step == stage.steps:
                self.summary[stage.name] = metrics
                _run.info.setdefault('stages', {})[stage.name] = {'end_step': gstep}
                self.tracker.stage_end(si, len(plan.curriculum), stage.name, offset + 1, gstep)
        if step == stage.steps:
            self.stage_end(si, opt, sched, run_id)
        elif step % plan.run.checkpoint_every == 0:
            self.checkpoint(si, step, opt, sched, run_id)

    def stage_end(self, si: int, opt, sched, run_id: str) -> None:
        """Weights of the finished stage, consolidated into one safetensors file (for init_from, export, probes),
        its memories, then the resume point: the next stage's start. Every rank calls it (FSDP gathers the weights
        and every rank writes its part of the checkpoint); rank 0 writes the rest."""
        stage = self.plan.curriculum[si]
        weights = D.full_state(self.model, self.world)
        if self.rank == 0:
            self.final_weights = weights
            self.save_weights(self.folder.stage_weights(stage.name))
            self.reference_weights(stage.name)
            self.write_memories(si, run_id)
        if si + 1 < len(self.plan.curriculum):
            self.checkpoint(si + 1, 0, None, None, run_id)
        else:
            self.checkpoint(si, stage.steps, opt, sched, run_id)

    def save_weights(self, path: Path) -> None:
        """The full weights (the last stage end's; the model's own where that was not in this process, e.g. a run
        resumed after its last stage) as one safetensors file. Rank 0."""
        weights = self.final_weights if self.final_weights is not None else D.full_state(self.model, 1)
        weights = {k: v.contiguous().cpu() for k, v in weights.items()}
        files.atomic_write(path, lambda p: save_file(weights, p))

    def plain_model(self):
        """A model whose entry points run in this process alone: the trained one, or under FSDP a copy built from
        the gathered weights (rank 0, after stage_end gathered them)."""
        if not any(hasattr(p, 'full_tensor') for p in self.model.parameters()):
            return self.model
        model = build(self.plan, self.vocab)
        model.load_state_dict(self.final_weights)
        return model.to(self.device).eval()

    def reference_weights(self, stage: str | None = None) -> None:
        """Record a stage's end weights (or the final ones) in the run's info by path, size and sha256: the
        database holds the reference, the run folder the bytes (runtime.run --artifacts blob adds the bytes)."""
        if self.rank:
            return
        ref = file_ref(self.folder.weights(stage))
        weights = self._run.info.setdefault('weights', {})
        if stage is None:
            weights['final'] = ref
        else:
            weights.setdefault('stages', {})[stage] = ref

    def memory_store(self) -> Path | None:
        return memory_store(self.plan.run) if family(self.plan).stores_memories else None

    def write_memories(self, si: int, run_id: str) -> None:
        """Memories of the held-out set -> Zarr group <run name>/<stage> (the run folder's name: store/layout.py),
        marked complete only when every row is in; a reference to the previous stage's group instead when the
        encoder has not changed since (store/memories.py)."""
        path = self.memory_store()
        if path is None:
            return
        plan, stage = self.plan, self.plan.curriculum[si].name
        tokenizer = self.folder.tokenizer if self.folder.tokenizer.is_file() else \
            self.data.cache_path / 'tokenizer.json'  # ranks > 0 and tests that drive the trainer alone
        attrs = {'run_key': self.folder.key, 'spec_hash': self.spec.hash, 'step': plan.stage_end(stage),
                 'family': plan.family, 'encoder_d_model': plan.encoder.d_model,
                 'chunks': plan.memory.chunks, 'chunk_len': plan.memory.chunk_len, 'vocab_size': self.vocab,
                 'tokenizer_path': str(tokenizer.resolve()),
                 'checkpoint_path': str(self.folder.stage_weights(stage).resolve()),
                 'special_ids': self.data.special_ids, 'bytes_per_token': self.data.bytes_per_token.get('val')}
        previous = plan.curriculum[si - 1].name if si else None
        model = self.plain_model()
        tokens, mask = self.data.val, self.data.val_mask
        try:  # the graph encodes, the store writes arrays (nothing is encoded when the previous stage's are shared)
            memories.write(path, self.folder.name, stage, model.encode_rows(tokens, mask, memories.ROWS),
                           (*tokens.shape, model.memory.d_dec),
                           dict(attrs, run_id=run_id, encoder_sha256=encoder_sha256(model.state_dict())),
                           dtype=plan.run.memory_dtype, previous=previous,
                           progress=f'stage {si + 1}/{len(plan.curriculum)} {stage}: memories')
        except OSError as e:  # a full disk: name the group and the disk (zarr's own error names no file)
            err = files.write_error(e, Path(path) / self.folder.name / stage / 'memories')
            if err is None:
                raise
            raise err from None

    def global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        return D.global_mean(values, self.world)

    def evaluate(self, desc: str = 'evaluation', leave: bool = True, stage=None) -> dict[str, float]:
        with tqdm(desc=desc, unit='rows', dynamic_ncols=True, file=sys.stderr, mininterval=1.0, leave=leave,
                  disable=self.rank > 0) as bar:
            return train.evaluate(self.model, self.plan, self.data.val, self.data.val_mask, self.ids,
                                  self.plan.data.batch_size, self.plan.run.eval_batches,
                                  self.data.bytes_per_token.get('val'), self.vocab, bar.update, stage)


SUMMARY_COLUMNS = [('clm.ce', 'clm loss'), ('clm.token_accuracy', 'clm acc'), ('copy.token_accuracy', 'copy acc'),
                   ('copy_ablated.token_accuracy', 'copy, memories ablated'),
                   ('blank_copy.token_accuracy', 'blank-copy acc'),
                   ('blank_copy_ablated.token_accuracy', 'blank copy, memories ablated'),
                   ('autoencode.token_accuracy', 'autoencode acc'), ('autoencode.info_proportion', 'I_e (ae)'),
                   ('clm.bits_per_byte', 'clm bpb')]


def summary_table(summary: dict[str, dict]) -> str:
    cols = [(k, name) for k, name in SUMMARY_COLUMNS if any(k in m for m in summary.values())]
    lines = ['| stage | ' + ' | '.join(n for _, n in cols) + ' |', '|---|' + '---|' * len(cols)]
    for stage, m in summary.items():
        lines.append(f'| {stage} | ' + ' | '.join(f'{m[k]:.3f}' if k in m else '-' for k, _ in cols) + ' |')
    return '\n'.join(lines)
