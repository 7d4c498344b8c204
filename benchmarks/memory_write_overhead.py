"""Cost of writing held-out memories to the Zarr store at every stage end, relative to the training run itself.

    python benchmarks/memory_write_overhead.py [--repeats 3] [--threads 1] [--steps-scale 1,10]

The same tiny training run (runtime.run.main, in this process, a fresh Sacred run each time) with the memory store
on (Run.memory_store default: <out_dir>/memories.zarr) and off (Run.memory_store='none'), interleaved
(on, off, on, off, ...) after one untimed warm-up run that builds the data cache. Reported:
- wall and process CPU time of each run, best of the repeats per setting, and the ratios on/off (target: overhead
  <= 5 %); CPU time is the steadier number on a machine shared with other jobs;
- the time spent inside store.memories.write itself (measured directly, so noise in the training time does not
  hide it), as a fraction of the best run with memories on.
Results go to benchmarks/results/memory_write_overhead.json.

The run: the flagship curriculum (specs/frozen_encoder_curriculum.gin) at the tiny scale used for development
(d32, vocab 300, 4 x 8-token chunks, batch 4, 4 stages of 30 / 3 / 2 / 2 steps x `--steps-scale`). Every stage end
encodes and writes the whole held-out set (507 sequences x 4 chunks), so the fixed cost of a write is compared with
37 training steps at scale 1 (a worst case: the shipped spec trains 800 / 900 / 200 / 300 steps) and 370 at scale 10.

Projection for the shipped spec (defaults: d128, vocab 1024, batch 32; too slow to run whole here): one
memories.write of its held-out set, timed, against the measured time of a training step of each stage times that
stage's steps (evaluation time left out of the denominator, so the projected overhead is an upper bound).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STAGES = {'autoencode': 30, 'blank': 3, 'copy': 2, 'combined': 2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--repeats', type=int, default=3, help='timed runs per setting')
    ap.add_argument('--threads', type=int, default=1,
                    help='torch threads (1: stable timings on a shared 2-core machine)')
    ap.add_argument('--steps-scale', default='1,10', help="comma-separated factors for every stage's steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

    from runtime import run as R
    from store import memories as M

    work = Path(tempfile.mkdtemp(prefix='memwrite_bench_'))
    spec = 'specs/frozen_encoder_curriculum.gin'
    base = [f"Run.out_dir='{work / 'runs'}'", f"Data.cache_dir='{work / 'cache'}'", 'Data.vocab_size=300', 'D_MODEL=32',
            'N_HEADS=2', 'BATCH=4', 'Stage.eval_every=10', 'Run.eval_batches=1', 'Run.log_every=10']

    write_time = [0.0]
    real_write = M.write

    def timed_write(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_write(*a, **kw)
        finally:
            write_time[0] += time.perf_counter() - t0

    M.write = timed_write  # runtime.run calls memories.write through the module: every write is timed

    def one(scale: float, store_on: bool):
        steps = [f'{k}/Stage.steps={max(1, round(v * scale))}' for k, v in STAGES.items()]
        bindings = base + steps + ([] if store_on else ["Run.memory_store='none'"])
        argv = [spec] + [x for b in bindings for x in ('-b', b)]
        write_time[0] = 0.0
        devnull = open(os.devnull, 'w')
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = devnull, devnull  # tqdm and Sacred's log lines
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            R.main(argv)
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            devnull.close()
        return time.perf_counter() - t0, time.process_time() - c0, write_time[0]

    print(f'warm-up (data cache) in {work} ...', flush=True)
    one(1, True)
    results = []
    for scale in [float(x) for x in args.steps_scale.split(',')]:
        wall, cpu = {True: [], False: []}, {True: [], False: []}
        writes = []
        for i in range(args.repeats):
            for on in (True, False):
                t, c, w = one(scale, on)
                wall[on].append(t)
                cpu[on].append(c)
                if on:
                    writes.append(w)
                print(f"  steps x{scale:g} repeat {i + 1}: memories {'on ' if on else 'off'} "
                      f"wall {t:7.2f} s  cpu {c:7.2f} s"
                      + (f'  (inside memories.write {w:.3f} s)' if on else ''), flush=True)
        best = {k: {on: min(v[on]) for on in v} for k, v in (('wall', wall), ('cpu', cpu))}
        w_best = min(writes)
        results.append({
            'steps_scale': scale, 'steps': {k: max(1, round(v * scale)) for k, v in STAGES.items()},
            'wall_with': wall[True], 'wall_without': wall[False], 'cpu_with': cpu[True], 'cpu_without': cpu[False],
            'best_wall_with': best['wall'][True], 'best_wall_without': best['wall'][False],
            'best_cpu_with': best['cpu'][True], 'best_cpu_without': best['cpu'][False],
            'ratio_wall': best['wall'][True] / best['wall'][False], 'ratio_cpu': best['cpu'][True] / best['cpu'][False],
            'overhead_percent_wall': 100 * (best['wall'][True] / best['wall'][False] - 1),
            'overhead_percent_cpu': 100 * (best['cpu'][True] / best['cpu'][False] - 1),
            'write_seconds_per_run': writes, 'best_write_seconds': w_best,
            'write_fraction_percent': 100 * w_best / best['wall'][True],
        })
    groups = M.listing(work / 'runs' / 'memories.zarr')
    print('projection for the shipped spec (defaults) ...', flush=True)
    shipped = projected_shipped(spec, work, real_write)
    summary = {
        'spec': spec, 'bindings': base, 'repeats': args.repeats, 'threads': args.threads, 'target_percent': 5.0,
        'memory_writes_per_run': len(STAGES), 'rows_per_write': groups[0]['shape'][0] if groups else None,
        'chunks_per_row': groups[0]['shape'][1] if groups else None, 'results': results, 'shipped_projection': shipped,
        'host': {'python': platform.python_version(), 'torch': torch.__version__, 'cpus': os.cpu_count(),
                 'load_average_end': os.getloadavg()},
    }
    print()
    print('best of repeats; cpu = process CPU time (less sensitive to other load on the machine than wall time)')
    print('| training steps | on: wall / cpu s | off: wall / cpu s | ratio on/off wall | ratio on/off cpu '
          '| inside memories.write |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f"| {sum(r['steps'].values())} | {r['best_wall_with']:.2f} / {r['best_cpu_with']:.2f} | "
              f"{r['best_wall_without']:.2f} / {r['best_cpu_without']:.2f} | {r['ratio_wall']:.3f} | "
              f"{r['ratio_cpu']:.3f} | "
              f"{r['best_write_seconds']:.3f} s = {r['write_fraction_percent']:.1f} % of the run |")
    print(f"| {shipped['train_steps']} (shipped spec, projected) | - | "
          f"{shipped['train_seconds']:.1f} (steps x step time) | - | - | "
          f"{shipped['write_seconds']:.3f} s x {shipped['writes']} writes = "
          f"{shipped['projected_overhead_percent']:.2f} % |")
    print(f"\n{len(STAGES)} writes of {summary['rows_per_write']} x {summary['chunks_per_row']} chunk memories "
          f"per run; target overhead <= 5 %; {args.threads} torch thread(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    out = ROOT / 'benchmarks' / 'results' / 'memory_write_overhead.json'
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f'results: {out}')
    shutil.rmtree(work, ignore_errors=True)


def projected_shipped(spec_path, work: Path, write) -> dict:
    """Shipped-spec defaults: time one memories.write of the held-out set and a training step of every stage."""
    from compiler import objectives as O
    from compiler.model import build
    from compiler.spec import load
    from runtime.data import prepare
    from runtime.step import accumulate
    from runtime.train import optimizer, set_frozen

    plan = load([spec_path], [f"Data.cache_dir='{work / 'cache'}'"]).plan
    data = prepare(plan, progress=False)
    model = build(plan, data.vocab_size)
    ids = O.SpecialIds(pad=data.pad_id, blank=data.blank_id, copy=data.copy_id)
    batches = data.loader(plan.data.batch_size, plan.run.seed)
    step_seconds = {}
    for stage in plan.curriculum:
        opt, _ = optimizer(set_frozen(model, stage), stage)
        times = []
        for i in range(6):
            tokens, mask = next(batches)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            accumulate(model, stage, tokens, mask, ids)  # the trainer's own step (forward, loss, backward)
            opt.step()
            if i >= 2:  # the first steps pay for allocation
                times.append(time.perf_counter() - t0)
        step_seconds[stage.name] = statistics.median(times)
    writes = []
    for _i in range(3):
        t0 = time.perf_counter()
        write(work / 'shipped.zarr', 'x', 'autoencode', model, data.val, data.val_mask, {})
        writes.append(time.perf_counter() - t0)
    train = sum(stage.steps * step_seconds[stage.name] for stage in plan.curriculum)
    w = statistics.median(writes)
    return {'steps': {s.name: s.steps for s in plan.curriculum}, 'train_steps': sum(s.steps for s in plan.curriculum),
            'step_seconds': step_seconds, 'train_seconds': train, 'write_seconds': w, 'writes': len(plan.curriculum),
            'held_out_rows': int(data.val.shape[0]), 'd_model': plan.decoder.d_model, 'batch': plan.data.batch_size,
            'projected_overhead_percent': 100 * len(plan.curriculum) * w / train}


if __name__ == '__main__':
    main()
