"""python -m runtime.run SPEC [more.gin ...] [-b BINDING ...] [--db URL] [--resume RUN_ID] [--artifacts blob]

Trains a spec's curriculum, stage by stage, and records the run with Sacred, as the experiment named after the spec
('frozen_encoder_curriculum'): config = the Plan + the operative gin text + the spec hash + provenance (git commit
and uncommitted diff or a source-tree hash, the sha256 of every init_from source; runtime/provenance.py) + `seed`
(Run.seed, Sacred's seed); info = the run key, host, run folder, data, stage end steps, the weights by path and
sha256; metrics (also as TensorBoard events in the run folder, runtime/tracking.py); captured output; status;
artifacts (operative config and summaries; the weights' bytes only with --artifacts blob). Run folder:
<Run.out_dir>/<id>-<key>/ (store/layout.py: the run key tells apart runs with the same id in different databases)
with run.json (the marker naming the run, with its provenance), run.lock (held while the run trains), checkpoint.pt
(latest, written atomically; its sha256 in checkpoint.pt.sha256, checked by --resume), stages/<stage>.safetensors
(weights at each stage end, what `init_from = 'run:<id>/<stage>'` reads), final.safetensors, tokenizer.json, summary.md,
tensorboard/, source.diff (uncommitted changes, when there are any).

Faults (tests/test_faults.py, tests/faults.py): a run killed at any moment continues with --resume
to the same weights, metrics and memories as an uninterrupted one, as one record (a run killed before its first
checkpoint starts again from its first step under the same id). SIGTERM and Ctrl-C stop it as INTERRUPTED with a
resume point (exit 143 / 130). A write that fails mid-run (disk full, folder gone) ends it FAILED with a message
naming the file and the disk (exit 1), and a run database that stops answering stops it (exit 1), before the next
checkpoint, so the last checkpoint is intact and --resume continues it. Refused before anything is recorded (exit 2):
a --resume that is not a run id, of a run another live process is training, from a damaged checkpoint or one that
holds anything but tensors and plain values; an in-memory database; unwritable output folders.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import torch

from compiler.__main__ import parser
from compiler.backbone import identity
from compiler.errors import UserError, cli
from compiler.families import family
from compiler.objectives import floors
from compiler.spec import load, locate, read_bindings
from compiler.tokens import backbones
from compiler.validate import CPU_PRECISION
from runtime import provenance, record, sharded, sweep
from runtime.checkpoint import check_init_sources, load_checkpoint, remove_stale_temporaries, restart_fix
from runtime.data import prepare
from runtime.distributed import NullRun, RankLost, check_parallel, distributed, run_device
from runtime.lock import LocksUnsupported, RunBusy, RunLock
from runtime.train import Divergence
from runtime.trainer import Trainer, summary_table
from store import database, memories
from store.database import flatten
from store.files import WriteFailed, check_writable, refuse_link, write_text
from store.layout import RunFolder, check_reference, memory_store, new_run_key, parse_name
from store.tables import spec_label


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers send before they kill a job), raised in the main thread like Ctrl-C, so the run
    stops the same way: INTERRUPTED, with a resume point."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def handler(signum, frame):
        # the first SIGTERM stops the run; a second one must not cut short the resume point and status it writes
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(e: KeyboardInterrupt) -> tuple[str, int]:
    if isinstance(e, RankLost):  # another rank of the job died: resumable from the last checkpoint
        return f'another rank of the job stopped; {e}', 1
    return ('SIGTERM', 128 + signal.SIGTERM) if isinstance(e, Terminated) else ('Ctrl-C', 130)


@dataclass
class Resume:
    """What --resume continues: the run's record and folder, and its checkpoint (None: the run was recorded but killed
    before its first checkpoint, so it starts again from step 0 under the same id and key)."""
    run: database.RunRecord
    folder: RunFolder
    checkpoint: dict | None

    @property
    def run_id(self) -> str:
        return self.run.id


def resume_target(ref: str, spec, runs_dir: Path, url: str, locks: list) -> Resume:
    """The run `--resume ref` names, found through its record (its run key names its folder), locked for this process
    when `locks` is a list (rank 0; the lock is appended), its checkpoint verified. Every refusal is exit 2, before
    anything is written or recorded."""
    where = f'--resume {ref}'
    run = _recorded(ref, where, url)
    run_id = run.id
    folder = RunFolder(runs_dir, run_id, run.run_key)
    owner = folder.owner()
    if owner is not None and (str(owner.get('run_id')) != run_id or owner.get('run_key') != run.run_key):
        raise UserError(where, f'{folder.root} belongs to another run ({folder.marker.name}: {owner})',
                        'leave it alone; check the --db and Run.out_dir of the run you mean')

    def same_plan(started_from):
        if started_from != spec.hash:
            raise UserError(where, f"run {run_id} was started from a different plan "
                            f"(hash {started_from}, this spec {spec.hash}){plan_difference(run.config, spec)}",
                            'resume with the same spec files and bindings'
                            + (f" (recorded: {' '.join(repr('-b ' + b) for b in run.config['bindings'])})"
                               if run.config.get('bindings') else ''))
    if run.config.get('spec_hash') is not None:  # before the lock: a refused resume leaves even the lock file alone
        same_plan(run.config['spec_hash'])
    if run.status == 'COMPLETED':  # --resume would train it again from its last checkpoint under the same record
        raise UserError(where, f'run {run.name} already COMPLETED: there is nothing to resume',
                        f'use its results (python -m store.runs show {run_id}; weights in {folder.final}), or drop '
                        '--resume to train the same spec again as a new run')
    for path in folder.written():  # before the lock: run.lock planted as a link must not be written through
        refuse_link(path)
    if locks is not None:
        lock = take_lock(folder, run, where)
        if lock is not None:
            locks.append(lock)
    resume = load_checkpoint(folder.checkpoint, where, run_id) if folder.checkpoint.is_file() else None
    if resume is not None and 'shards' in resume and locks is not None:  # rank 0 checks the shards for every rank
        sharded.verify(folder.root, resume['shards'], where, restart_fix(folder.checkpoint, run_id))
    same_plan(run.config.get('spec_hash') if resume is None else resume['spec_hash'])
    return Resume(run, folder, resume)


def _recorded(ref: str, where: str, url: str) -> database.RunRecord:
    """The record of the run `--resume ref` names (an id or '<id>-<key>'), with a run key."""
    check_reference(ref, where)
    run_id, key = parse_name(ref)
    try:
        found = database.open_db(url).runs(run_id=run_id)  # an absent SQLite file stays absent
    except UserError as e:  # no database there, or it does not answer: say so, as the answer to --resume
        raise UserError(where, f'{e.where}: {e.what}', e.fix)
    run = found[0] if found else None
    if run is None:
        raise UserError(where, f'run {run_id} is not in {database.display_url(url)}',
                        'give the id of a run recorded there (python -m store.runs list), or pass the --db the run '
                        'was recorded in')
    if run.run_key is None:
        raise UserError(where, f'run {run_id} was recorded without a run key (by a memspec older than run keys), '
                        f'so its folder cannot be told apart from other runs numbered {run_id}',
                        'start a new run with the same spec (its numbers will be the same)')
    if key is not None and key != run.run_key:
        raise UserError(where, f'run {run_id} of {database.display_url(url)} is {run.name}, not {ref}',
                        f'resume {run.name}, or pass the --db that recorded {ref}')
    return run


def resume_line(plan, target: Resume) -> str:
    """What a resume continues from, said before any work: 'resuming run 3 at step 12 of 30 (stage 2/4 blank_copy,
    step 3 of 9)'."""
    ck, total = target.checkpoint, plan.stage_start(len(plan.curriculum))
    head = f'resuming run {target.run.name}'
    if ck is None:
        return f'{head} at step 0 of {total}: it was stopped before its first checkpoint, so it starts again'
    si, step = ck['stage'], ck['step']
    stage = plan.curriculum[si]
    return (f'{head} at step {done_steps(plan, ck)} of {total} (stage {si + 1}/{len(plan.curriculum)} {stage.name}, '
            f'step {step} of {stage.steps})')


def plan_difference(config: dict, spec, limit: int = 8) -> str:
    """'; bindings that differ: ...' between a run's recorded config and a spec: the operative gin's bindings and
    macros (what the user wrote), else the plan's keys (a default that changed between versions), else ''."""
    def side(value):
        return 'unset' if value is _UNSET else repr(value)

    was, now = read_bindings(config.get('operative_gin') or ''), read_bindings(spec.operative)
    rows = []
    for old, new in zip(was, now):
        rows += [f'{k}: {side(old.get(k, _UNSET))} in the run, {side(new.get(k, _UNSET))} here'
                 for k in sorted(set(old) | set(new)) if old.get(k, _UNSET) != new.get(k, _UNSET)]
    what = 'bindings that differ'
    if not rows and isinstance(config.get('plan'), dict):
        old, new = flatten({'plan': config['plan']}), flatten({'plan': _sanitize(spec.plan.to_dict())})
        rows = [f'{k}: {side(old.get(k, _UNSET))} in the run, {side(new.get(k, _UNSET))} here'
                for k in sorted(set(old) | set(new)) if old.get(k, _UNSET) != new.get(k, _UNSET)]
        what = 'plan keys that differ'
    if not rows:
        return ''
    more = f' (and {len(rows) - limit} more)' if len(rows) > limit else ''
    return f'; {what}: ' + '; '.join(rows[:limit]) + more


_UNSET = object()


def take_lock(folder: RunFolder, run: database.RunRecord, where: str) -> RunLock | None:
    """The run's lock for this process, or UserError naming the live process that holds it. A lock taken on another
    host is invisible here on some network filesystems: a holder on another host whose heartbeat is fresh counts as
    alive too."""
    folder.root.mkdir(parents=True, exist_ok=True)
    silent = run.silent_for()
    beat = 'never beat' if silent is None else f'last heartbeat {database.span(silent)} ago'
    try:
        lock = RunLock(folder.lock).acquire()
    except RunBusy as e:
        pid, host = e.holder.get('pid', '?'), e.holder.get('host', '?')
        raise UserError(where, f'run {run.id} is being trained by a live process: pid {pid} on {host} holds '
                        f"{folder.lock} (since {e.holder.get('since', '?')}; {beat})",
                        f'wait for it to finish, or stop it (kill {pid} on {host}) and --resume {run.id} again: '
                        'the lock of a process that died is free')
    except LocksUnsupported as e:
        if silent is not None and silent < database.STALE_AFTER:
            raise UserError(where, f'run {run.id} may be running: it is RUNNING with its {beat}, and the filesystem '
                            f'of {folder.root} cannot lock files ({e})',
                            f'if its process is dead, --resume again when its heartbeat is older than '
                            f'{database.span(database.STALE_AFTER)} (python -m store.runs list marks it stale)')
        print(f'note: {folder.root} is on a filesystem without file locks ({e}): nothing stops a second process '
              f'resuming run {run.id} at the same time', file=sys.stderr)
        return None
    other = lock.previous.get('host')
    if other and other != socket.gethostname() and silent is not None and silent < database.STALE_AFTER:
        lock.give_back()
        raise UserError(where, f"run {run.id} may still be running on host {other} (pid {lock.previous.get('pid')}): "
                        f'its {beat}, and a file lock taken on another host is not seen here',
                        f'if that process is dead, --resume again when its heartbeat is older than '
                        f'{database.span(database.STALE_AFTER)} (python -m store.runs list marks it stale)')
    return lock


def done_steps(plan, resume: dict | None) -> int:
    """Global steps a resume point has behind it."""
    return 0 if resume is None else plan.stage_start(resume['stage']) + resume['step']


def writable_store(store: Path) -> Path:
    """The folder a memory store's writes go to: the store itself once it exists, else the folder it is created in."""
    return store if store.exists() else store.parent


@cli
def main(argv=None):
    ap = parser('python -m runtime.run', __doc__.split('\n\n')[0])
    ap.add_argument('--db', help='observer database URL (default sqlite:///<Run.out_dir>/sacred.db)')
    ap.add_argument('--resume', metavar='RUN_ID',
                    help='continue a killed or interrupted run: its id (python -m store.runs list), not a path')
    ap.add_argument('--sweep-member', help=argparse.SUPPRESS)  # from runtime.sweep: recorded as the config 'sweep'
    ap.add_argument('--record-id-to', help=argparse.SUPPRESS)  # runtime.launch: the run id, for a requeued job
    sweep.add_options(ap)
    ap.add_argument('--artifacts', choices=('reference', 'blob'), default='reference',
                    help="final weights in the run database: by path and sha256 (default), or also their bytes as a "
                         "Sacred artifact ('blob'; hundreds of MB per run at paper scale)")
    args = ap.parse_args(argv)
    sweep.run_requested(args)  # --sweep: the grid runs as a sweep of member runs, and exits
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
    locks: list[RunLock] = []
    with sigterm_as_interrupt():
        try:
            _run_main(args, locks)
        except KeyboardInterrupt as e:  # before the run was recorded (execute handles the rest)
            how, code = _interrupt(e)
            print(f'\ninterrupted ({how}) before the run was recorded: nothing was recorded; start it again',
                  file=sys.stderr)
            sys.exit(code)
        finally:
            for lock in locks:
                lock.release()


def _run_main(args, locks: list) -> None:
    spec = load(args.specs, args.binding, devices=int(os.environ.get('WORLD_SIZE', '1')))
    plan = spec.plan
    device = run_device(plan.run, locate(spec.locations, plan.run, 'device'))
    rank, world = distributed(device)
    check_parallel(plan.run.parallel, world, locate(spec.locations, plan.run, 'parallel'))
    if rank == 0:
        for w in spec.warnings:  # also recorded in the run's config ('warnings')
            print(f'warning: {w}', file=sys.stderr)
        if plan.run.device == 'auto' and device.type == 'cpu' and plan.run.precision in CPU_PRECISION:
            what, fix = CPU_PRECISION[plan.run.precision]  # the validator judged Run.device = 'cpu' alone
            print(f"warning: Run.precision = '{plan.run.precision}' and Run.device = 'auto' trains on the CPU here "
                  f'(no CUDA): {what}\n  fix: {fix}', file=sys.stderr)
    runs_dir = Path(plan.run.out_dir)
    url = args.db or database.default_url(plan.run.out_dir)
    record.check_lasting(url)
    target = None if args.resume is None else resume_target(args.resume, spec, runs_dir, url,
                                                            locks if rank == 0 else None)
    checkpoint = None if target is None else target.checkpoint
    if target is not None and rank == 0:
        print(resume_line(plan, target), file=sys.stderr)
    data = prepare(plan, progress=rank == 0)  # bad data is bad input: refuse it before anything is recorded
    check_init_sources(plan, runs_dir, checkpoint, data.vocab_size)
    if rank > 0:  # workers train in lockstep with rank 0 (DDP / FSDP) and record nothing
        Trainer(spec, data, target.folder.root if target else runs_dir / '_worker', checkpoint, rank,
                world).run(NullRun())
        return
    check_writable(runs_dir, locate(spec.locations, plan.run, 'out_dir'))
    store = memory_store(plan.run) if family(plan).stores_memories else None
    if store is not None:
        where = locate(spec.locations, plan.run, 'memory_store')
        check_writable(writable_store(store), where, 'Run.memory_store')
        try:
            memories.check_store(store)  # a damaged store is found now, not when the first stage has trained
        except UserError as e:
            raise UserError(where, f'{e.where}: {e.what}', e.fix)
    obs = record.observer(url)
    outcome = execute(spec, data, obs, url, runs_dir, target, world, locks, args.artifacts,
                      sweep.member_config(args.sweep_member), args.record_id_to)
    if outcome.get('error'):
        print(outcome['error'], file=sys.stderr)
        sys.exit(outcome['code'])
    print(f"\nrun {outcome['run_id']} COMPLETED  (plan {spec.hash})\n\n{outcome['table']}\n")
    print(f"run folder   {outcome['out_dir']}  (final.safetensors, stages/, summary.md; "
          f"tensorboard --logdir {runs_dir})")
    print(f'database     {database.display_url(url)}  (python -m store.runs show {outcome["run_id"]})')
    if outcome['memories'] is not None:
        print(f"memories     {outcome['memories']}  (group {outcome['name']}/<stage>; "
              f"python -m store.analyze info {outcome['name']} --store {outcome['memories']})")


def copy_tokenizer(data, folder: RunFolder) -> None:
    """The run's tokenizer in its folder: generation, analysis and export then need no data cache (which another
    machine would have to rebuild, from the network for hub data)."""
    if not folder.tokenizer.is_file():
        write_text(folder.tokenizer, (data.cache_path / 'tokenizer.json').read_text())


def open_folder(folder: RunFolder, url: str, locks: list, origin: dict | None = None) -> None:
    """A new run's folder: created (never an existing one: it would be another run's), locked, marked."""
    try:
        folder.root.mkdir(parents=True)
    except FileExistsError:
        raise UserError(f'run {folder.run_id}', f'{folder.root} already exists: it belongs to another run',
                        'start the run again (it gets a new run key)')
    try:
        locks.append(RunLock(folder.lock).acquire())
    except LocksUnsupported:
        pass  # a new folder has no other user; --resume reports the missing locks
    mark(folder, url, origin)


def mark(folder: RunFolder, url: str, origin: dict | None = None) -> None:
    """The folder's marker: whose folder it is, where it is recorded and (a new run) its provenance (the diff itself
    is in source.diff beside it)."""
    if origin:
        origin = {**origin, 'code': {k: v for k, v in origin['code'].items() if k != 'diff'}}
    write_text(folder.marker, json.dumps({'run_id': folder.run_id, 'run_key': folder.key,
                                          'database': database.display_url(url),
                                          **({'provenance': origin} if origin else {})}, indent=1) + '\n')


ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')  # terminal control sequences (tqdm moves the cursor between its bars)


def experiment_name(spec) -> str:
    """The Sacred experiment of a run: its spec, as store.runs labels it ('frozen_encoder_curriculum',
    'mixer/autoencoder', 'memory_clm+paper_scale'); Run.name stays the run's own label."""
    return '+'.join(spec_label(f).removesuffix('.gin') for f in spec.sources) or spec.plan.run.name


def origin(spec, runs_dir: Path, resume: dict | None) -> tuple[dict, str]:
    """(the run's provenance for its config and run.json, the uncommitted diff of the code)."""
    code, diff = provenance.source_state()
    first = 0 if resume is None else resume['stage'] + (resume['optimizer'] is not None)
    return {'code': code, 'seed': spec.plan.run.seed,
            'init_from': provenance.init_sources(spec.plan, runs_dir, first)}, diff


def execute(spec, data, obs, url: str, runs_dir: Path, target: Resume | None, world: int = 1,
            locks: list | None = None, artifacts: str = 'reference', sweep_member: dict | None = None,
            record_id_to: str | None = None) -> dict:
    """Train and record the run as a Sacred experiment; -> {'run_id', 'name', 'out_dir', 'table', 'memories'} or, when
    the run stopped, {'error': message, 'code': exit code} (the run's record says INTERRUPTED or FAILED)."""
    sacred = record.import_sacred()
    from sacred.utils import apply_backspaces_and_linefeeds
    plan = spec.plan
    locks = [] if locks is None else locks
    key = target.run.run_key if target is not None else new_run_key()
    resume = None if target is None else target.checkpoint
    # what the run prints is captured (Sacred's captured_out), tqdm's redraws collapsed to their last state
    sacred.SETTINGS.CAPTURE_MODE = 'sys'
    # Sacred records the source of every project module the run has imported (compiler/, store/, runtime/), not only
    # those runtime/run.py names itself
    sacred.SETTINGS.DISCOVER_SOURCES = 'sys'
    ex = sacred.Experiment(experiment_name(spec), base_dir=str(provenance.ROOT), save_git_info=False)
    ex.captured_out_filter = lambda text: ANSI.sub('', apply_backspaces_and_linefeeds(text))
    if hasattr(obs, 'initial_info'):
        obs.initial_info = {'run_key': key}  # recorded with the new run row itself: a run never exists without it
    ex.observers.append(obs)
    made, diff = origin(spec, runs_dir, resume)
    ex.add_config({'plan': _sanitize(plan.to_dict()), 'operative_gin': spec.operative, 'spec_hash': spec.hash,
                   'spec_files': spec.files, 'spec_sources': spec.sources, 'bindings': spec.bindings,
                   'warnings': [str(w) for w in spec.warnings], 'seed': plan.run.seed, 'provenance': made})
    if sweep_member is not None:
        ex.add_config({'sweep': sweep_member})
    holder = {}

    @ex.main
    def _main(_run):
        run_id = str(_run._id)
        folder = RunFolder(runs_dir, run_id, key)
        holder.update(run_id=run_id, name=folder.name)
        enter_folder(folder, target, url, locks, made, _run, plan, record_id_to)
        _run.info['host'] = host_info()
        _run.info['run_dir'] = str(folder.root)
        write_text(folder.operative, spec.operative)
        if diff and target is None:
            write_text(folder.source_diff, diff)
        copy_tokenizer(data, folder)
        if target is not None and hasattr(obs, 'forget_after'):  # steps after the checkpoint are replayed
            obs.forget_after(run_id, done_steps(plan, resume))
        trainer = Trainer(spec, data, folder.root, resume, 0, world)  # rank 0 records; ranks > 0 ran in main
        d = trainer.data
        _run.info['data'] = {'cache': str(d.cache_path), 'vocab_size': trainer.vocab, 'special_ids': d.special_ids,
                             'stats': d.stats,  # what token statistics alone achieve on the held-out targets
                             'floors': floors(*d.sample('train'), d.val, d.val_mask, trainer.vocab)}
        if backbones(plan):  # the pretrained bases the run's weights apply to (they are not in its checkpoints)
            _run.info['backbones'] = {role: identity(b) for role, b in backbones(plan) if not b.share_encoder}
        summary = trainer.run(_run)
        trainer.save_weights(folder.final)
        trainer.reference_weights()
        table = summary_table(summary)
        write_text(folder.summary_md, f'# run {run_id} ({plan.run.name}, plan {spec.hash})\n\n{table}\n')
        write_text(folder.summary_json, json.dumps(summary, indent=2))
        small = [folder.operative, folder.summary_md, folder.summary_json] \
            + ([folder.source_diff] if folder.source_diff.is_file() else [])
        for path in ([folder.final] if artifacts == 'blob' else []) + small:
            _run.add_artifact(str(path), path.name)
        holder.update(out_dir=folder.root, table=table, memories=trainer.memory_store())
        last = summary[plan.curriculum[-1].name]
        return float(last.get('clm.ce', last.get('autoencode.ce', 0.0)))

    try:
        ex.run(options={'--id': target.run_id} if target is not None else {}, info={'run_key': key})
    except (Divergence, KeyboardInterrupt, record.RecordingLost, sa.exc.SQLAlchemyError, OSError) as e:
        return stopped(e, holder, obs, url)
    if getattr(obs, 'lost', None) is not None:
        return {'error': f"\nerror: run {holder['run_id']} finished (weights and summary in {holder['out_dir']}) "
                         f"but the run database {database.display_url(url)} stopped answering at the end, "
                         f"so its status and artifacts are not recorded.\n  When it answers again, record them: "
                         f"rerun the same command "
                         f"with --resume {holder['run_id']}", 'code': 1}
    return holder


def enter_folder(folder: RunFolder, target: Resume | None, url: str, locks: list, made: dict, _run, plan,
                 record_id_to: str | None = None) -> None:
    """A new run's folder is created, locked and marked; a resumed one loses the temporaries (and uncommitted shards)
    of the killed process, and the run's info lists this process's code beside the start's (config 'provenance') and
    earlier resumes'. record_id_to: a file that gets the run's id (a submitit job's requeue resumes it:
    runtime/launch.py)."""
    if record_id_to:
        write_text(Path(record_id_to), folder.run_id)
    if target is None:
        open_folder(folder, url, locks, made)
        return
    remove_stale_temporaries(folder.root)
    resume = target.checkpoint
    sharded.prune(folder.root, None if resume is None else resume.get('shards'))  # shards no checkpoint.pt names
    if folder.owner() is None:  # killed between creating the folder and marking it
        mark(folder, url, made)
    _run.info['resumes'] = list(target.run.info.get('resumes') or []) + [
        {'at_step': done_steps(plan, target.checkpoint),
         'code': {k: v for k, v in made['code'].items() if k != 'diff'},
         'time': record.now().isoformat(timespec='seconds')}]


def stopped(e: BaseException, holder: dict, obs, url: str) -> dict:
    """{'error': message, 'code': exit code} of a run that stopped: diverged, interrupted, lost its database, or
    could not write (disk full, folder removed, I/O error: stopped before the checkpoint the write belonged to)."""
    if isinstance(e, Divergence):
        return {'error': f'error: run diverged: {e}. The run is recorded as FAILED.', 'code': 1}
    if isinstance(e, KeyboardInterrupt):
        how, code = _interrupt(e)
        return {'error': f"\ninterrupted ({how}): the run is recorded as INTERRUPTED; continue it with --resume "
                         f"{holder.get('run_id', '<id>')}", 'code': code}
    if isinstance(e, (record.RecordingLost, sa.exc.SQLAlchemyError)):
        cause = e if isinstance(e, record.RecordingLost) else \
            f'the run database {database.display_url(url)} failed ({database.first_line(e, url)})'
        return {'error': f'\nerror: {cause}.\n  The run stopped before its next checkpoint: everything up to its last '
                         f'checkpoint is recorded and nothing after it is lost. '
                         f'{_continue(holder, "when the database answers again")}', 'code': 1}
    what = str(e) if isinstance(e, WriteFailed) else f"cannot write {e.filename or 'a file'}: {e.strerror or e}"
    status = 'recorded as FAILED' if getattr(obs, 'lost', None) is None else \
        f'left RUNNING (the run database {database.display_url(url)} did not take its status)'
    return {'error': f"\nerror: {what}.\n  The run is {status}; its last checkpoint is intact (written "
                     f"atomically). {_continue(holder, 'after freeing space or fixing the folder')}", 'code': 1}


def _continue(holder: dict, when: str) -> str:
    if 'run_id' not in holder:
        return f'{when[0].upper()}{when[1:]}, start the run again.'
    return f"{when[0].upper()}{when[1:]}, continue it with --resume {holder['run_id']} (same spec and bindings)."


if __name__ == '__main__':
    main()
