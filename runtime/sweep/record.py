"""What the run database says about a sweep's members: their runs, the one a rerun continues, and the sweep entry a
member records in its config."""
from __future__ import annotations

import json

from compiler.errors import UserError
from runtime.sweep.expand import Member, stored
from store import database
from store.layout import RunFolder


def records(url: str, name: str | None = None, sweep_id: str | None = None) -> list[database.RunRecord]:
    """The runs of the sweep called `name` (and of one invocation of it, `sweep_id`) in the database, oldest first."""
    db = database.open_db(url)
    try:
        runs = db.runs()
    finally:
        if hasattr(db, 'engine'):
            db.engine.dispose()  # no pooled connection left open on the file the members write
    return [r for r in runs if r.config.get('sweep') and (name is None or r.config['sweep'].get('name') == name)
            and (sweep_id is None or r.config['sweep'].get('sweep_id') == sweep_id)]


def _identity(r: database.RunRecord) -> tuple:
    s = r.config.get('sweep') or {}
    return s.get('trial'), s.get('seed'), json.dumps(s.get('grid') or {}, sort_keys=True)


def prior(m: Member, recorded: list[database.RunRecord]) -> database.RunRecord | None:
    """The recorded run a rerun continues from: a COMPLETED one of the same plan, else the latest of that plan."""
    same = [r for r in recorded if _identity(r) == m.key() and r.config.get('spec_hash') == m.hash]
    done = [r for r in same if r.status == 'COMPLETED']
    return (done or same or [None])[-1]


def resumable(run: database.RunRecord | None, out_dir: str) -> bool:
    """Did the run stop where `--resume` continues it: INTERRUPTED, RUNNING with a stale heartbeat (its process was
    killed), or FAILED with a checkpoint?"""
    if run is None:
        return False
    silent = run.silent_for()
    return run.status == 'INTERRUPTED' or (silent is not None and silent >= database.STALE_AFTER) or (
        run.status == 'FAILED' and RunFolder(out_dir, run.id, run.run_key).checkpoint.is_file())


def member_config(text: str | None) -> dict | None:
    """runtime.run --sweep-member JSON: what a member records as its config entry `sweep`."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError('--sweep-member', 'not a JSON object', 'leave this option to python -m runtime.sweep')
    return stored(value)
