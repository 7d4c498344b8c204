"""python -m runtime.run SPEC [more.gin ...] [-b BINDING ...] [--db URL] [--resume RUN_ID]

Trains a spec's curriculum, stage by stage, and records the run with Sacred: config = the Plan + the operative
gin text + the spec hash; metrics; status; artifacts (final weights as safetensors, operative config, summary).
Run folder: <Run.out_dir>/<run id>/ with checkpoint.pt (latest, written atomically; its sha256 in checkpoint.pt.sha256,
checked by --resume), stages/<stage>.safetensors (weights at each stage end, what `init_from = 'run:<id>/<stage>'`
reads), final.safetensors, summary.md.

Faults (tests/test_faults.py, tests/faults.py): a run killed at any moment continues with --resume
to the same weights, metrics and memories as an uninterrupted one, as one record (a run killed before its first
checkpoint starts again from its first step under the same id). A write that fails mid-run (disk full, folder gone)
or a run database that stops answering stops the run with a message and exit code 1, before the next checkpoint, so
the last checkpoint is intact and --resume continues it. A damaged checkpoint is refused (exit 2).
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import sqlalchemy as sa
import torch

from compiler.__main__ import parser
from compiler.errors import SpecError, cli
from compiler.families import family
from compiler.spec import load, locate
from runtime import record
from runtime.checkpoint import check_writable, load_checkpoint, remove_stale_temporaries
from runtime.data import prepare
from runtime.distributed import NullRun, distributed, run_device
from runtime.train import Divergence, check_init_sources
from runtime.trainer import Trainer, summary_table
from store import database
from store.layout import RunFolder, memory_store


def _sanitize(obj):
    """Sacred config keys may not contain '.' (MongoDB): 'encoder.embedding' -> 'encoder:embedding'."""
    if isinstance(obj, dict):
        return {str(k).replace('.', ':'): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    return obj


def host_info() -> dict:
    import importlib.metadata as md
    pkgs = {p: md.version(p) for p in ('torch', 'xformers', 'gin-config', 'sacred', 'zarr', 'tokenizers', 'datasets')}
    return {'python': platform.python_version(), 'packages': pkgs, 'threads': torch.get_num_threads()}


def resume_point(run_id: str, spec, folder: RunFolder, url: str) -> dict | None:
    """The checkpoint --resume continues (None: the run was recorded but killed before its first checkpoint, so it
    starts again from step 0 under the same id). Refuses unknown runs and runs of another plan (exit 2)."""
    where = f'--resume {run_id}'
    if folder.checkpoint.is_file():
        resume = load_checkpoint(folder.checkpoint, where, run_id)
        started_from = resume['spec_hash']
    else:
        resume = None
        config = database.recorded_config(url, run_id)  # None: no such run (an absent SQLite file stays absent)
        if config is None:
            raise SpecError(where, f'no checkpoint at {folder.checkpoint}',
                            'give the id of a run started with this out_dir (python -m store.runs list)')
        started_from = config.get('spec_hash')
    if started_from != spec.hash:
        raise SpecError(where, f"run {run_id} was started from a different plan "
                        f"(hash {started_from}, this spec {spec.hash})", 'resume with the same spec files and bindings')
    return resume


def done_steps(plan, resume: dict | None) -> int:
    """Global steps a resume point has behind it."""
    return 0 if resume is None else plan.stage_start(resume['stage']) + resume['step']


@cli
def main(argv=None):
    ap = parser('python -m runtime.run', __doc__.split('\n\n')[0])
    ap.add_argument('--db', help='observer database URL (default sqlite:///<Run.out_dir>/sacred.db)')
    ap.add_argument('--resume', metavar='RUN_ID', help='continue a killed or interrupted run')
    args = ap.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    spec = load(args.specs, args.binding, devices=int(os.environ.get('WORLD_SIZE', '1')))
    plan = spec.plan
    rank, world = distributed(run_device(plan.run, locate(spec.locations, plan.run, 'device')))
    if rank == 0:
        for w in spec.warnings:  # also recorded in the run's config ('warnings')
            print(f'warning: {w}', file=sys.stderr)
    runs_dir = Path(plan.run.out_dir)
    url = args.db or database.default_url(plan.run.out_dir)
    resume = None if args.resume is None else resume_point(args.resume, spec, RunFolder(runs_dir, args.resume), url)
    data = prepare(plan, progress=rank == 0)  # bad data is bad input: refuse it before anything is recorded
    check_init_sources(plan, runs_dir, resume, data.vocab_size)
    if rank > 0:  # workers train in lockstep with rank 0 (gradients all-reduced) and record nothing
        Trainer(spec, data, runs_dir / (args.resume or '_worker'), resume, rank, world).run(NullRun())
        return
    check_writable(runs_dir, locate(spec.locations, plan.run, 'out_dir'))
    store = memory_store(plan.run) if family(plan).stores_memories else None
    if store is not None:
        check_writable(store.parent, locate(spec.locations, plan.run, 'memory_store'))
    obs = record.observer(url)
    if args.resume is not None and database.recorded_config(url, args.resume) is None:
        raise SpecError(f'--resume {args.resume}', f'run {args.resume} is not in {database.display_url(url)}',
                        'pass the --db the run was recorded in')
    outcome = execute(spec, data, obs, url, runs_dir, args.resume, resume, world)
    if outcome.get('error'):
        print(outcome['error'], file=sys.stderr)
        sys.exit(outcome['code'])
    print(f"\nrun {outcome['run_id']} COMPLETED  (plan {spec.hash})\n\n{outcome['table']}\n")
    print(f"run folder   {outcome['out_dir']}  (final.safetensors, stages/, summary.md)")
    print(f'database     {database.display_url(url)}  (python -m store.runs show {outcome["run_id"]})')
    if outcome['memories'] is not None:
        print(f"memories     {outcome['memories']}  (group {outcome['run_id']}/<stage>; python -m store.analyze info)")


def execute(spec, data, obs, url: str, runs_dir: Path, resume_id: str | None, resume: dict | None,
            world: int = 1) -> dict:
    """Train and record the run as a Sacred experiment; -> {'run_id', 'out_dir', 'table', 'memories'} or, when the
    run stopped, {'error': message, 'code': exit code} (the run's record says INTERRUPTED or FAILED)."""
    from sacred import SETTINGS, Experiment
    plan = spec.plan
    SETTINGS.CAPTURE_MODE = 'no'  # tqdm owns the terminal; output capture would store carriage-return noise
    ex = Experiment(plan.run.name, save_git_info=False)
    ex.observers.append(obs)
    ex.add_config({'plan': _sanitize(plan.to_dict()), 'operative_gin': spec.operative, 'spec_hash': spec.hash,
                   'spec_files': spec.files, 'spec_sources': spec.sources, 'bindings': spec.bindings,
                   'warnings': [str(w) for w in spec.warnings]})
    holder = {}

    @ex.main
    def _main(_run):
        run_id = str(_run._id)
        holder['run_id'] = run_id
        folder = RunFolder(runs_dir, run_id)
        folder.root.mkdir(parents=True, exist_ok=True)
        if resume_id is not None:
            remove_stale_temporaries(folder.root)
        _run.info['host'] = host_info()
        _run.info['run_dir'] = str(folder.root)
        folder.operative.write_text(spec.operative)
        if resume_id is not None and hasattr(obs, 'forget_after'):  # steps after the checkpoint are replayed
            obs.forget_after(run_id, done_steps(plan, resume))
        trainer = Trainer(spec, data, folder.root, resume, 0, world)  # rank 0 records; ranks > 0 ran in main
        _run.info['data'] = {'cache': str(trainer.data.cache_path), 'vocab_size': trainer.vocab,
                             'special_ids': trainer.data.special_ids, 'stats': trainer.data.stats}
        summary = trainer.run(_run)
        trainer.save_weights(folder.final)
        table = summary_table(summary)
        folder.summary_md.write_text(f'# run {run_id} ({plan.run.name}, plan {spec.hash})\n\n{table}\n')
        folder.summary_json.write_text(json.dumps(summary, indent=2))
        for path in (folder.final, folder.operative, folder.summary_md, folder.summary_json):
            _run.add_artifact(str(path), path.name)
        holder.update(run_id=run_id, out_dir=folder.root, table=table, memories=trainer.memory_store())
        last = summary[plan.curriculum[-1].name]
        return float(last.get('clm.ce', last.get('autoencode.ce', 0.0)))

    try:
        ex.run(options={'--id': resume_id} if resume_id is not None else {})
    except Divergence as e:
        return {'error': f'error: run diverged: {e}. The run is recorded as FAILED.', 'code': 1}
    except KeyboardInterrupt:
        return {'error': f"\ninterrupted: the run is recorded as INTERRUPTED; continue it with --resume "
                         f"{holder.get('run_id', '<id>')}", 'code': 130}
    except (record.RecordingLost, sa.exc.SQLAlchemyError) as e:
        cause = e if isinstance(e, record.RecordingLost) else \
            f'the run database {database.display_url(url)} failed ({database.first_line(e)})'
        return {'error': f'\nerror: {cause}.\n  The run stopped before its next checkpoint: everything up to its last '
                         f'checkpoint is recorded and nothing after it is lost. '
                         f'{_continue(holder, "when the database answers again")}', 'code': 1}
    except OSError as e:  # disk full, folder removed, I/O error: stopped before the checkpoint the write belonged to
        return {'error': f"\nerror: cannot write {e.filename or 'a file'}: {e.strerror or e}.\n  The run stopped; its "
                         f"last checkpoint is intact (written atomically). "
                         f"{_continue(holder, 'after freeing space or fixing the folder')}", 'code': 1}
    if getattr(obs, 'lost', None) is not None:
        return {'error': f"\nerror: run {holder['run_id']} finished (weights and summary in {holder['out_dir']}) "
                         f"but the run database {database.display_url(url)} stopped answering at the end, "
                         f"so its status and artifacts are not recorded.\n  When it answers again, record them: "
                         f"rerun the same command "
                         f"with --resume {holder['run_id']}", 'code': 1}
    return holder


def _continue(holder: dict, when: str) -> str:
    if 'run_id' not in holder:
        return f'{when[0].upper()}{when[1:]}, start the run again.'
    return f"{when[0].upper()}{when[1:]}, continue it with --resume {holder['run_id']} (same spec and bindings)."


if __name__ == '__main__':
    main()
