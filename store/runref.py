"""RUN, as every command takes it: a run id ('3'), the run's full name ('3-1a2b3c4d5e', its folder and memory
group), or the path of its run folder ('runs/3-1a2b3c4d5e'). One resolver serves runtime.evaluate,
runtime.generate, store.export, store.analyze and store.runs, with one error when nothing matches.

    folder_of(ref, runs)       the run folder (commands that read a folder: generate, evaluate)
    record_of(db, ref)         the run database's record (export, runs); a folder path names its run by the id and
                               key of its marker (run.json)
    database_for(ref, db)      --db, else for a folder path the database beside it (<out_dir>/sacred.db)
    load_run(ref, stage, ...)  a run's model through compiler.load: its operative.gin, its weights checked against
                               the sha256 its database recorded, its tokenizer

Ids repeat across run databases, so an id that several folders (or store groups) share is refused with the
candidates listed (store/layout.py resolve); folders named `<id>` from before run keys are read too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from compiler.errors import UserError
from store.layout import RunFolder, parse_name

FIX = ('give a run id (python -m store.runs list), its full name <id>-<key>, or the path of its run folder '
       '(a folder that holds operative.gin)')


def no_run(ref, looked: str, known: list[str]) -> UserError:
    """The one error of every command when RUN matches nothing; `looked` says where it looked, `known` what it holds
    (ids of a database, names of run folders or memory groups; the newest 20)."""
    held = f"known: {', '.join(known[-20:])}" if known else 'it holds no runs'
    return UserError(f'RUN {ref}', f'no run matches {ref!r}: it is not a run folder, and {looked} has no run with '
                     f'that id or name ({held})', FIX)


def _names(folder: Path) -> list[str]:
    """The run folders' names under `folder`, oldest id first."""
    names = [p.name for p in folder.iterdir() if p.is_dir() and parse_name(p.name)] if folder.is_dir() else []
    return sorted(names, key=lambda n: (int(parse_name(n)[0]), n))


def folder_at(ref) -> RunFolder | None:
    """RUN as the path of a run folder (it holds operative.gin or the run.json marker), else None."""
    path = Path(str(ref))
    if not path.is_dir():
        return None
    folder = RunFolder.at(path)
    if not (folder.operative.is_file() or folder.marker.is_file()):
        return None
    owner = folder.owner() or {}
    if owner.get('run_id') is not None:  # the marker knows the run, whatever the folder is called now
        folder.run_id, folder.key = str(owner['run_id']), owner.get('run_key')
    return folder


def folder_of(ref, runs='runs') -> RunFolder:
    """The run folder RUN names: its path, or an id or full name under `runs` (a path whose parent holds the folder,
    e.g. runs/3, is read as the id 3 under runs/)."""
    found = folder_at(ref)
    if found is not None:
        return found
    path = Path(str(ref))
    under, name = (path.parent, path.name) if len(path.parts) > 1 else (Path(runs), str(ref))
    if parse_name(name) is not None:
        found = RunFolder.find(under, name, f'RUN {ref}')  # an id several folders share: refused, listed
        if found is not None:
            return found
    raise no_run(ref, f'the folder {under}', _names(under))


def database_for(ref, db: str | None, default: str | None = None) -> str | None:
    """The run database to look RUN up in: --db; else, when RUN is a folder's path, the database beside it
    (<out_dir>/sacred.db, where runtime.run records by default) if there is one; else `default`."""
    from store.database import default_url
    if db:
        return db
    folder = folder_at(ref)
    if folder is not None and (folder.out_dir / 'sacred.db').is_file():
        return default_url(folder.out_dir)
    return default


def record_of(db, ref):
    """The run database's record of RUN (an id, a full name, or a run folder's path)."""
    folder = folder_at(ref)
    if folder is not None:
        run_id, key = folder.run_id, folder.key
    else:
        parsed = parse_name(str(ref))
        run_id, key = parsed or (None, None)
    found = db.runs(run_id=run_id) if run_id is not None else []
    if not found or (key is not None and found[0].run_key not in (None, key)):
        raise no_run(ref, db.name, [r.id for r in db.runs()])
    return found[0].check()  # a record changed outside memspec: one message naming the run and field


def recorded_sha256(folder: RunFolder, stage: str | None) -> str | None:
    """The sha256 the run's database (the one beside its folder) recorded for these weights; None: not recorded."""
    from store.database import default_url, recorded_run
    if not (folder.out_dir / 'sacred.db').is_file():
        return None
    try:
        run = recorded_run(default_url(folder.out_dir), folder.run_id)
    except UserError:
        return None
    if run is None or (folder.key is not None and run.run_key not in (None, folder.key)):
        return None  # another database's run with this id
    weights = run.info.get('weights') or {}
    ref = (weights.get('stages') or {}).get(stage) if stage else weights.get('final')
    return ref.get('sha256') if isinstance(ref, dict) else None


def load_run(ref, stage: str | None = None, *, runs='runs', device: str = 'cpu',
             vocabulary: Callable | None = None, check: Callable | None = None):
    """compiler.load.Loaded of RUN: the plan of its operative.gin, the final weights (or those at the end of `stage`)
    checked against the sha256 its database recorded, and its tokenizer (the folder's copy; runs recorded before
    folders held one: `vocabulary(plan)` builds it, e.g. runtime.data.prepare). Every family loads; what a family
    can do with its model (generate, score, decode) is the caller's question to the family registry; `check(plan,
    where)` asks it before any weights are read."""
    from compiler import load
    from compiler.spec import load as load_spec
    folder = ref if isinstance(ref, RunFolder) else folder_of(ref, runs)
    where = f'run {folder.root}'
    plan = load_spec([str(folder.operative)]).plan
    if check is not None:
        check(plan, where)
    if stage is not None and stage not in plan.stage_names:
        raise UserError(f'--stage {stage}', f"run {folder.root} has no stage '{stage}' (stages: "
                        f"{', '.join(plan.stage_names)})", 'pick one of the listed stages, or leave --stage out for '
                        'the final weights')
    weights = folder.weights(stage)
    if not weights.is_file():
        raise UserError(where, f'no weights at {weights} (the run did not finish' + (' that stage)' if stage else ')'),
                        'let the run finish (python -m runtime.run ... --resume ID), or pick a finished --stage')
    tokenizer = folder.tokenizer if folder.tokenizer.is_file() or vocabulary is None else vocabulary(plan)
    loaded = load.load(plan, weights, where=where, fix='rerun the run (or the stage) to rewrite its weights',
                       sha256=recorded_sha256(folder, stage), tokenizer=tokenizer, device=device)
    loaded.folder = folder
    return loaded
