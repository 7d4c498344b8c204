"""Views derived from a run's record that several commands show (store.runs, store.compare, store.export): the
metrics at each stage's end, the status with dead runs flagged, the provenance of the code in one line."""
from __future__ import annotations

import json
from pathlib import Path

from store.database import STALE_AFTER, RunRecord, span


def stage_end_metrics(db, run: RunRecord) -> dict[str, dict[str, float]]:
    """stage -> {eval metric (without 'eval/'): value at the stage's last step}. From the metrics table; the
    run's summary.json (artifact, or file in the run folder) where the table has none."""
    ends = run.end_steps
    out: dict[str, dict[str, float]] = {}
    if ends:
        by_step: dict[int, list[str]] = {}
        for stage, step in ends.items():
            by_step.setdefault(step, []).append(stage)
        for name, step, value in db.at_steps(run.id, sorted(by_step)):
            for stage in by_step.get(step, []):
                out.setdefault(stage, {})[name[len('eval/'):]] = value
    if out:
        return {s: out[s] for s in sorted(out, key=lambda s: ends[s])}
    raw = db.artifact(run.id, 'summary.json')
    if raw is None and run.info.get('run_dir'):
        p = Path(run.info['run_dir']) / 'summary.json'
        raw = p.read_bytes() if p.is_file() else None
    try:
        summary = json.loads(raw) if raw else {}
    except ValueError:
        summary = {}
    return {s: {k: float(v) for k, v in m.items()} for s, m in summary.items() if isinstance(m, dict)}


def status_text(run: RunRecord) -> str:
    """The status, with RUNNING flagged when the run's heartbeat stopped: its process died without a word (kill -9,
    power loss), and `python -m runtime.run ... --resume ID` continues it."""
    if run.damaged:  # listed, so it can be found; commands that read the whole run refuse it (RunRecord.check)
        return f"{run.status[:20]} (damaged: {', '.join(d.split(' (')[0] for d in run.damaged)})"
    silent = run.silent_for()
    if silent is not None and silent > STALE_AFTER:
        return f'RUNNING (stale: no heartbeat for {span(silent)})'
    return run.status


def code_line(code: dict) -> str:
    """The provenance of a run's code in one line (runtime/provenance.py records it)."""
    if code.get('kind') == 'git':
        # runs recorded before 'dirty' meant "the diff is not empty" were also dirty for untracked files alone
        dirty = (f"dirty: {code.get('diff_bytes', 0):,} bytes of diff (sha256 {str(code.get('diff_sha256'))[:12]})"
                 if code.get('dirty') and code.get('diff_bytes') else 'clean')
        files = [f.get('path', '?') for f in code.get('untracked') or [] if isinstance(f, dict)]
        if files:
            more = len(files) - 5 + int(code.get('untracked_more') or 0)
            dirty += f", untracked files hashed: {', '.join(files[:5])}" + (f' and {more} more' if more > 0 else '')
        return f"git {str(code.get('commit'))[:12]} on {code.get('branch', '?')}, {dirty}"
    if code.get('kind') == 'tree':
        return f"source tree sha256 {str(code.get('sha256'))[:12]} ({code.get('files')} files; not a git checkout)"
    return 'not recorded'
