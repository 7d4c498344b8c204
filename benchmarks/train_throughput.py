"""Training throughput of the chunk-parallel memory model against the research approach, in one process.

    python benchmarks/train_throughput.py                       # d256 and d512, 4 layers, 4 x 128 tokens, CPU
    python benchmarks/train_throughput.py --compile             # + ours with Run.compile (its own rows)
    python benchmarks/train_throughput.py --device cuda         # same on a GPU (bf16 autocast for every model)
    python benchmarks/train_throughput.py --models ours --precision fp32 bf16 fp16   # the runtime's step per
                                                                # Run.precision, with ratios against fp32
    python benchmarks/train_throughput.py --device cuda --paper --compile   # paper scale: d512, 16 layers, 4 x 256
    python benchmarks/train_throughput.py --profile ours        # where the time of one model goes

Models, all on identical dimensions and identical (seeded, random-token) batches, each a full training step
(forward, loss, backward, optimizer step):
- research: the research code's memory model as docs/science.md describes it, written here: a Hugging Face
  `LlamaModel` encoder and `LlamaForCausalLM` decoder, a Python loop over chunks for the encoder (one call per
  chunk) and for the decoder (one call per chunk, its memories as prefix embeddings, logits for every
  position), per-chunk losses averaged, a default `torch.optim.AdamW`.
- ours: specs/memory_clm.gin compiled by this project and trained by the runtime's own step (runtime/step.py: the
  TrainStep module under Run.precision, its gradient scaler, clipping and fused AdamW; one batched encoder call, one
  decoder call over all chunks, last-block work nobody reads skipped).
- full context: a causal transformer over all N*L tokens (specs/full_context.gin), no memory.
- no memory: ours with every memory slot padding (specs/no_memory.gin).
- NAME+compile: NAME with Run.compile (runtime.train.compile_step: each objective's whole step, example to loss,
  one compiled graph); research+compile: the research module under torch.compile. Compiled models get a fresh
  inductor cache (unless --inductor-cache), so their first step is a cold compilation: reported as compile_s. The
  graph breaks of our compiled step (torch._dynamo.explain) are printed and recorded.
The encoder is causal here for every model, as in the research code, so all do the same work per token.

Model FLOP utilisation = achieved training FLOP/s (the compiler's cost model, compiler.cost, times measured
tokens/s; FLOPs of work the model needs, so a model doing extra work gets no credit for it) / the peak matmul
FLOP/s measured in the same process (best of several large square products, fp32 on CPU, bf16 on CUDA, measured
at the start and again after each size, since a shared machine's speed drifts: the best seen is the peak).
Timing: warm-up steps, then `--rounds` rounds that run every model in turn (so drift hits all alike); the
reported step time is the median over rounds. Results go to benchmarks/results/train_throughput.json.
--precision runs every model in each Run.precision given (NAME@bf16; the first precision keeps the plain name): ours
through TrainStep's autocast and scaler, research under the same autocast; each row's speed is also given against
the same model in the first precision, measured in the same process (x first precision).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compiler import cost  # noqa: E402
from compiler import model as M  # noqa: E402
from compiler import objectives as O  # noqa: E402
from compiler import plan as P  # noqa: E402
from compiler.spec import SPECS_DIR, load  # noqa: E402
from runtime import step as S  # noqa: E402
from runtime import train as T  # noqa: E402

SPECS = {'research': 'memory_clm.gin', 'ours': 'memory_clm.gin', 'full_context': 'full_context.gin',
         'no_memory': 'no_memory.gin'}
COMPILE = '+compile'
MODELS = ['research', 'ours', 'full_context', 'no_memory']
COMPILED_MODELS = ['research', 'ours', 'ours+compile']
PAPER = {'sizes': [512], 'layers': 16, 'chunks': 4, 'chunk_len': 256, 'vocab': 8192}  # specs/base/paper_scale.gin
STAGE = P.Stage(name='clm', steps=10 ** 6, lr=2e-4, warmup=0, objectives=(P.Objective(kind='clm'),))
IDS = O.SpecialIds(pad=0, blank=1, copy=2)


def plan_for(spec: str, d: int, layers: int, chunks: int, chunk_len: int, vocab: int, attention: str) -> P.Plan:
    return load([SPECS_DIR / spec], [f'D_MODEL = {d}', f'N_LAYERS = {layers}', f'N_HEADS = {max(1, d // 64)}',
                                     f'CHUNKS = {chunks}', f'CHUNK_LEN = {chunk_len}', f'VOCAB = {vocab}',
                                     'encoder/Stack.causal = True', f"Stack.attention = '{attention}'"]).plan


class ResearchChunkLoop(nn.Module):
    """The research approach (docs/science.md): HF Llama encoder and decoder, a loop over chunks."""

    def __init__(self, plan: P.Plan):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

        def config(s: P.Stack, positions: int):
            return LlamaConfig(hidden_size=s.d_model, intermediate_size=s.ffn, num_hidden_layers=s.n_layers,
                               num_attention_heads=s.n_heads, num_key_value_heads=s.kv_heads, rms_norm_eps=s.norm_eps,
                               rope_theta=s.rope_theta, vocab_size=plan.data.vocab_size,
                               max_position_embeddings=positions, tie_word_embeddings=False,
                               attn_implementation='sdpa')
        n, l = plan.memory.chunks, plan.memory.chunk_len
        self.encoder = LlamaModel(config(plan.encoder, l))
        self.decoder = LlamaForCausalLM(config(plan.decoder, n + l))
        self.pad = nn.Parameter(torch.zeros(plan.decoder.d_model))

    def forward(self, tokens):
        b, n, l = tokens.shape
        memories = [self.encoder(input_ids=tokens[:, c]).last_hidden_state[:, -1] for c in range(n - 1)]
        loss = 0.0
        for c in range(n):
            slots = torch.stack(memories[:c] + [self.pad.expand(b, -1)] * (n - c), 1)
            x = torch.cat([slots, self.decoder.model.embed_tokens(tokens[:, c])], 1)
            logits = self.decoder(inputs_embeds=x).logits[:, n:-1]
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, c, 1:].reshape(-1))
        return loss / n


def train_step_fn(kind: str, plan: P.Plan, device, precision: str, compile_model: bool,
                  micro_batch: int | None = None):
    """A closure running one full training step on a batch (the batch is passed in)."""
    torch.manual_seed(0)
    if kind == 'research':
        model = ResearchChunkLoop(plan).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=STAGE.lr, betas=(0.9, 0.95), weight_decay=STAGE.weight_decay)
        if compile_model:
            model.compile()
        scaler = S.grad_scaler(device, precision)

        def step(tokens):
            with S.autocast(device, precision):
                loss = model(tokens)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            return loss
        return step, model.train()
    # the runtime's own step: TrainStep (micro-batches of Stage.micro_batch rows) and optimizer_step
    model = M.build(plan).to(device)
    stage = dataclasses.replace(STAGE, micro_batch=micro_batch)
    params = T.set_frozen(model, stage)
    opt, sched = T.optimizer(params, stage)
    train_step = S.TrainStep(model, IDS, precision)
    train_step.stage = stage
    if compile_model:  # the whole step, as Run.compile does
        T.compile_step(model, ROOT / '.cache/memspec')
    scaler = S.grad_scaler(device, precision)
    model.train()

    def step(tokens):
        loss = S.forward_backward(train_step, train_step, tokens, None, scaler)[0]
        S.optimizer_step(opt, sched, scaler, params)
        opt.zero_grad(set_to_none=True)
        return loss
    return step, model


def peak_matmul_flops(device, dtype, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matrix product: the machine's attainable matmul peak, measured now."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float('inf')
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def measure(models: dict, batches, device, warmup: int, steps: int, rounds: int):
    """Seconds per step of each model: warm-up, then rounds that run every model for `steps` steps in turn.
    Returns ({model: [seconds per step, one per round]}, {model: seconds of its first step}): a compiled model's
    first step compiles it."""
    first = {}
    for name, step in models.items():
        for i in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            float(step(batches[i % len(batches)]).detach())
            if i == 0:
                first[name] = time.perf_counter() - t0
    sync(device)
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, step in models.items():
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                loss = step(batches[i % len(batches)])
            float(loss.detach())  # the step is done when its loss exists
            times[name].append((time.perf_counter() - t0) / steps)
    return times, first


def graph_breaks(model, batch, precision: str) -> dict:
    """torch._dynamo.explain of our compiled region (runtime.train.objective_loss) on one batch: how many graphs
    and why it broke. Resets dynamo, so it runs before anything is compiled."""
    with S.autocast(batch.device, precision):
        ex = torch._dynamo.explain(T.objective_loss)(model, STAGE.objectives[0], batch, None, IDS)
    return {'graphs': ex.graph_count, 'graph_breaks': ex.graph_break_count,
            'reasons': [str(b.reason).splitlines()[0] for b in ex.break_reasons]}


def profile(step, batches, device, top: int = 25) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    step(batches[0])
    with prof(activities=acts) as p:
        for i in range(3):
            step(batches[i % len(batches)])
        sync(device)
    key = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return p.key_averages().table(sort_by=key, row_limit=top)


def model_row(plan, times: list, first: float | None, compiled: bool, tokens: int, peak: float) -> dict:
    """One model's numbers at one size: median step time, throughput, the work per token it needs, MFU, and (compiled)
    the cold compilation (its first step less one step's work)."""
    step_s = statistics.median(times)
    flops = cost.flops_per_token(plan, training=True, objective='clm')  # the work the model needs
    row = {'step_s': step_s, 'all_step_s': times, 'tokens_per_s': tokens / step_s, 'train_flops_per_token': flops,
           'mfu': flops * tokens / step_s / peak, 'first_step_s': first}
    if compiled:
        row['compile_s'] = first - step_s
    return row


def ratios_of(rows: dict, entries: dict, first: str) -> tuple[dict, dict]:
    """-> ({row: its research row in the same precision}, {row: the same model's row in the first precision})."""
    research = {n: next((m for m, (k, p) in entries.items() if k == 'research' and p == prec), None)
                for n, (_, prec) in entries.items()}
    baseline = {n: next(m for m, (j, p) in entries.items() if j == k and p == first) for n, (k, _) in entries.items()}
    return research, baseline


def versus(rows: dict, name: str, other: str | None) -> float:
    """Speed of `name` relative to `other`, both measured in this process."""
    return rows[name]['tokens_per_s'] / rows[other]['tokens_per_s'] if other in rows else float('nan')


def print_rows(rows: dict, research: dict, baseline: dict, first: str) -> None:
    print(f'| model | step (s) | tokens/s | x research | x {first} | train GFLOP/token | MFU | cold compile (s) |\n'
          '|---|---|---|---|---|---|---|---|')
    for n, r in rows.items():
        comp = f"{r['compile_s']:.1f}" if 'compile_s' in r else '-'
        print(f"| {n} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {versus(rows, n, research[n]):.2f} | "
              f"{versus(rows, n, baseline[n]):.2f} | {r['train_flops_per_token'] / 1e9:.3f} | {r['mfu']:.1%} | "
              f'{comp} |')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--sizes', type=int, nargs='+', default=[256, 512], help='d_model values')
    ap.add_argument('--layers', type=int, default=4)
    ap.add_argument('--chunks', type=int, default=4)
    ap.add_argument('--chunk-len', type=int, default=128)
    ap.add_argument('--vocab', type=int, default=8192)
    ap.add_argument('--paper', action='store_true', help='paper scale (specs/base/paper_scale.gin) by default: '
                    + ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in PAPER.items()))
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--steps', type=int, default=2, help='steps per model per round')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    ap.add_argument('--models', nargs='+', help=f'of {", ".join(SPECS)}, each also as NAME+compile (default: '
                    f'{" ".join(MODELS)}; with --compile: {" ".join(COMPILED_MODELS)})')
    ap.add_argument('--attention', default='auto', choices=['auto', 'sdpa', 'xformers'],
                    help="our models' backend (auto: xformers on CUDA when it imports, else sdpa)")
    ap.add_argument('--compile', action='store_true', help='add ours with Run.compile to the default models')
    ap.add_argument('--inductor-cache', help='inductor cache of compiled models (default: a fresh temporary folder, '
                    'so the first step is a cold compilation)')
    ap.add_argument('--precision', nargs='+', choices=list(S.DTYPES), help='Run.precision of every model, each in '
                    'turn (default: fp32 on the CPU, bf16 on CUDA); ratios against the first')
    ap.add_argument('--micro-batch', type=int, help='Stage.micro_batch of our models (rows per forward/backward)')
    ap.add_argument('--profile', help='print a profile of one model instead of timing (research, ours, ...)')
    ap.add_argument('--out', default=str(ROOT / 'benchmarks/results/train_throughput.json'))
    if ap.parse_known_args()[0].paper:
        ap.set_defaults(**PAPER)
    args = ap.parse_args()
    models = args.models or (COMPILED_MODELS if args.compile else MODELS)
    unknown = [m for m in models if m.removesuffix(COMPILE) not in SPECS]
    if unknown:
        ap.error(f'unknown models {unknown}: choose from {list(SPECS)}, each optionally with {COMPILE}')

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    compiled = [m for m in models if m.endswith(COMPILE)]
    if compiled:  # cold unless told otherwise: runtime.train.compile_step keeps a cache folder it is given
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = str(Path(args.inductor_cache or
                                                         tempfile.mkdtemp(prefix='memspec-inductor-')).resolve())
    # CPU trains in fp32 by default (bf16 autocast is slower on CPUs without AMX); CUDA in bf16 autocast
    precisions = args.precision or (['bf16'] if cuda else ['fp32'])
    S.set_matmul_precision('fp32', device)  # TF32 for the fp32 rows on CUDA, as the runtime sets it
    entries = {(k if p == precisions[0] else f'{k}@{p}'): (k, p) for p in precisions for k in models}
    attention = args.attention
    peak_dtype, peak_n = (torch.bfloat16, 8192) if cuda else (torch.float32, 2048)
    # measured again after each size: this machine's speed drifts
    peaks = [peak_matmul_flops(device, peak_dtype, peak_n)]
    peak = peaks[0]
    result = {'device': torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
              'threads': args.threads, 'torch': torch.__version__, 'precisions': precisions,
              'batch': args.batch, 'layers': args.layers, 'chunks': args.chunks, 'chunk_len': args.chunk_len,
              'vocab': args.vocab, 'paper': args.paper, 'models': list(entries), 'micro_batch': args.micro_batch,
              'attention': attention, 'inductor_cache': os.environ.get('TORCHINDUCTOR_CACHE_DIR') if compiled else None,
              'peak_matmul_flops': peak, 'sizes': {}}
    print(f'{result["device"]}, {args.threads} threads, torch {torch.__version__}, {", ".join(precisions)}; '
          f'peak matmul {peak / 1e9:.1f} GFLOP/s')
    for d in args.sizes:
        plans = {k: plan_for(SPECS[k.removesuffix(COMPILE)], d, args.layers, args.chunks, args.chunk_len, args.vocab,
                             attention) for k in models}
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(3, args.vocab, (args.batch, args.chunks, args.chunk_len), generator=g).to(device)
                   for _ in range(4)]
        steps, built = {}, {}
        for name, (k, prec) in entries.items():
            steps[name], built[name] = train_step_fn(k.removesuffix(COMPILE), plans[k], device, prec, k in compiled,
                                                     args.micro_batch)
        if args.profile:
            print(profile(steps[args.profile], batches, device))
            continue
        ours = [k for k in compiled if not k.startswith('research')]
        breaks = graph_breaks(built[ours[0]], batches[0], precisions[0]) if ours else None
        times, first = measure(steps, batches, device, args.warmup, args.steps, args.rounds)
        peaks.append(peak_matmul_flops(device, peak_dtype, peak_n))
        peak = max(peaks)  # the attainable peak: the best seen in this process
        tokens = args.batch * args.chunks * args.chunk_len
        rows = {n: {**model_row(plans[k], times[n], first.get(n), k in compiled, tokens, peak), 'precision': prec}
                for n, (k, prec) in entries.items()}
        research, baseline = ratios_of(rows, entries, precisions[0])
        ratios = {f'{n}_vs_research': versus(rows, n, research[n]) for n in rows if research[n] not in (None, n)}
        ratios.update({f'{n}_vs_{precisions[0]}': versus(rows, n, baseline[n]) for n in rows if baseline[n] != n})
        result['sizes'][d] = {'models': rows, 'ratios': ratios, 'peak_matmul_flops': peak, 'graph_breaks': breaks}
        result['peak_matmul_flops'], result['all_peaks'] = peak, peaks
        print(f'\nd_model {d}, {args.layers} layers, {args.chunks} x {args.chunk_len} tokens, batch {args.batch}, '
              f'vocab {args.vocab}; '
              f'peak matmul {peak / 1e9:.1f} GFLOP/s (best of {len(peaks)} measurements)')
        if breaks is not None:
            print(f"our compiled step ({ours[0]}): {breaks['graphs']} graph(s), {breaks['graph_breaks']} graph "
                  f"break(s){': ' + '; '.join(breaks['reasons']) if breaks['reasons'] else ''}")
        print_rows(rows, research, baseline, precisions[0])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every size: a time limit keeps the rest
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
