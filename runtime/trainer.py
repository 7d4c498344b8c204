"""The training loop over a plan's curriculum (one stage's math is in runtime/train.py)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from compiler import objectives as O
from compiler.families import family
from compiler.model import build, encoder_sha256
from compiler.objective_registry import objective
from runtime import checkpoint as ckpt
from runtime import train
from runtime.checkpoint import init_component
from runtime.distributed import all_reduce_grads, run_device
from runtime.tracking import Tracker
from runtime.train import Divergence, DivergenceWatch, accumulate, compile_step, optimizer, set_frozen
from store import files, memories
from store.layout import RunFolder, file_ref, memory_store


class Trainer:
    """Trains a plan's curriculum stage by stage in one run folder: checkpoints, stage-end weights, evaluation,
    memories, and the metrics it hands to Sacred and TensorBoard (runtime/tracking.py). Rank > 0 of a torchrun job
    trains in lockstep and writes nothing."""

    def __init__(self, spec, data, out_dir: Path, resume: dict | None, rank: int = 0, world: int = 1):
        self.spec, self.plan, self.data = spec, spec.plan, data
        self.rank, self.world = rank, world
        self.ids = O.SpecialIds(pad=self.data.pad_id, blank=self.data.blank_id, copy=self.data.copy_id)
        self.vocab = self.data.vocab_size
        self.device = run_device(self.plan.run)  # refused (exit 2) by runtime.run before this when unavailable
        self.model = build(self.plan, self.vocab).to(self.device)  # built (seeded) on the CPU: the same weights
        if self.plan.run.compile:
            compile_step(self.model, self.plan.data.cache_dir)
        self.batches = self.data.loader(self.plan.data.batch_size, self.plan.run.seed, rank=rank, world=world)
        self.out_dir, self.folder, self.resume = out_dir, RunFolder.at(out_dir), resume
        self.summary: dict[str, dict] = {}
        self._run = None
        self.tracker: Tracker | None = None

    def checkpoint(self, stage_idx: int, step: int, opt, sched, run_id: str) -> None:
        """The resume point: stage `stage_idx` at `step`. Between stages (opt None) the next stage starts with fresh
        optimizer state, so none is stored."""
        if self.rank:
            return
        self.stage_batches(stage_idx)  # the data position is kept with the batch size of the stage it resumes
        state = {'model': _cpu(self.model.state_dict()), 'optimizer': None if opt is None else _cpu(opt.state_dict()),
                 'scheduler': None if sched is None else sched.state_dict(), 'data': self.batches.state_dict(),
                 'stage': stage_idx, 'step': step, 'spec_hash': self.spec.hash, 'rng': torch.random.get_rng_state(),
                 'summary': self.summary, 'run_id': run_id}
        if self.device.type == 'cuda':  # memory noise draws from the GPU's generator
            state['cuda_rng'] = torch.cuda.get_rng_state(self.device)
        if opt is None:
            state['boundary'] = True
        self.flush_metrics()
        ckpt.save_checkpoint(self.folder.checkpoint, state)

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
        resumed_at = None if self.resume is None else self.plan.stage_start(self.resume['stage']) + self.resume['step']
        self.tracker = Tracker(_run, self.folder.tensorboard if self.rank == 0 else None, resumed_at)
        try:
            return self._train(_run)
        finally:
            self.tracker.close()

    def _train(self, _run) -> dict:
        plan, run_id = self.plan, str(_run._id)
        torch.manual_seed(plan.run.seed)
        start_stage, start_step, ck = 0, 0, None
        if self.resume is not None:
            ck = self.resume
            self.model.load_state_dict(ck['model'])
            self.stage_batches(ck['stage'])
            self.batches.load_state_dict(ck['data'])
            torch.random.set_rng_state(ck['rng'])
            if 'cuda_rng' in ck and self.device.type == 'cuda':
                torch.cuda.set_rng_state(ck['cuda_rng'], self.device)
            start_stage, start_step, self.summary = ck['stage'], ck['step'], ck['summary']
            for s in plan.curriculum:  # the stages finished before the kill (the info of the new process lacks them)
                if s.name in self.summary:
                    _run.info.setdefault('stages', {})[s.name] = {'end_step': plan.stage_end(s.name)}
                    self.reference_weights(s.name)
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
                opt.load_state_dict(ck['optimizer'])
                sched.load_state_dict(ck['scheduler'])
            self.train_stage(_run, si, stage, opt, sched, start_step if resuming else 0, offset, run_id)
            offset += stage.steps
        return self.summary

    def train_stage(self, _run, si, stage, opt, sched, step, offset, run_id):
        plan, model = self.plan, self.model
        model.train()
        tokens_per_step = plan.batch_rows(stage) * plan.memory.chunks * plan.memory.chunk_len * len(stage.objectives)
        params = [p for g in opt.param_groups for p in g['params']]
        bar = tqdm(total=stage.steps, initial=step, desc=f'stage {si + 1}/{len(plan.curriculum)} {stage.name}',
                   dynamic_ncols=True, file=sys.stderr, mininterval=1.0, disable=self.rank > 0)
        t0, done, watch = time.perf_counter(), 0, DivergenceWatch(stage)
        while step < stage.steps:
            loss, losses, accs, grad_norm = self.train_step(si, stage, step, opt, sched, params, bar, watch, run_id)
            lr = opt.param_groups[0]['lr']  # the rate of this update (the scheduler moves it on below)
            opt.step()
            sched.step()
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

    def train_step(self, si, stage, step, opt, sched, params, bar, watch, run_id):
        """Forward and backward of one batch, gradients reduced and clipped -> (loss, {kind: loss}, {kind: metric},
        gradient norm before clipping). Ctrl-C before the update rewinds the batch and leaves a resume point."""
        position, rng = self.batches.state_dict(), torch.random.get_rng_state()
        try:
            tokens, mask = next(self.batches)
            tokens = tokens.to(self.device)  # the mask stays on the CPU: accumulate decides padding there
            opt.zero_grad(set_to_none=True)
            loss, losses, accs = accumulate(self.model, stage, tokens, mask, self.ids)
            watch.add(loss, losses)
            all_reduce_grads(params, self.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # before clipping: what train/grad_norm logs
        except KeyboardInterrupt:
            bar.close()
            watch.check()  # never a diverged resume point
            self.batches.load_state_dict(position)
            torch.random.set_rng_state(rng)
            self.checkpoint(si, step, opt, sched, run_id)
            raise
        return loss, losses, accs, grad_norm

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
            # mid-stage evaluations vanish under the stage's bar
            metrics = self.evaluate(f'stage {si + 1}/{len(plan.curriculum)} {stage.name}: evaluation',
                                    leave=step == stage.steps, stage=stage)
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
        """Weights of the finished stage (for init_from), then the resume point: the next stage's start."""
        if self.rank:
            return
        stage = self.plan.curriculum[si]
        self.save_weights(self.folder.stage_weights(stage.name))
        self.reference_weights(stage.name)
        self.write_memories(si, run_id)
        if si + 1 < len(self.plan.curriculum):
            self.checkpoint(si + 1, 0, None, None, run_id)
        else:
            self.checkpoint(si, stage.steps, opt, sched, run_id)

    def save_weights(self, path: Path) -> None:
        weights = {k: v.contiguous().cpu() for k, v in self.model.state_dict().items()}
        files.atomic_write(path, lambda p: save_file(weights, p))

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
        tokens, mask = self.data.val, self.data.val_mask
        try:  # the graph encodes, the store writes arrays (nothing is encoded when the previous stage's are shared)
            memories.write(path, self.folder.name, stage, self.model.encode_rows(tokens, mask, memories.ROWS),
                           (*tokens.shape, self.model.memory.d_dec),
                           dict(attrs, run_id=run_id, encoder_sha256=encoder_sha256(self.model.state_dict())),
                           dtype=plan.run.memory_dtype, previous=previous,
                           progress=f'stage {si + 1}/{len(plan.curriculum)} {stage}: memories')
        except OSError as e:  # a full disk: name the group and the disk (zarr's own error names no file)
            err = files.write_error(e, Path(path) / self.folder.name / stage / 'memories')
            if err is None:
                raise
            raise err from None

    def global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Means over ranks of per-rank scalars (what a single process with the global batch would log)."""
        flat = torch.stack([v.detach().float() for v in values.values()])
        if self.world > 1:
            torch.distributed.all_reduce(flat)
            flat /= self.world
        return dict(zip(values, flat.tolist()))

    def evaluate(self, desc: str = 'evaluation', leave: bool = True, stage=None) -> dict[str, float]:
        with tqdm(desc=desc, unit='rows', dynamic_ncols=True, file=sys.stderr, mininterval=1.0, leave=leave,
                  disable=self.rank > 0) as bar:
            return train.evaluate(self.model, self.plan, self.data.val, self.data.val_mask, self.ids,
                                  self.plan.data.batch_size, self.plan.run.eval_batches,
                                  self.data.bytes_per_token.get('val'), self.vocab, bar.update, stage)


def _cpu(state):
    """A state dict with its tensors on the CPU, so a checkpoint written on a GPU loads anywhere (CPU tensors are
    returned as they are: no copy)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cpu(v) for v in state)
    return state


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
