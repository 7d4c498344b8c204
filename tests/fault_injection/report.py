"""The campaign: scenarios run side by side, their results summed up and tabled."""
from __future__ import annotations

import collections
import json
import os
import sys
import time
import traceback
from pathlib import Path

from fault_injection.common import (
    PG_DEFAULT,
)


def run_parallel(tasks: list, jobs: int, root: Path) -> list[dict]:
    """tasks: [(name, callable -> dict)]; each runs in its own forked worker (up to `jobs` at once)."""
    results, running, queue = {}, {}, list(tasks)
    while queue or running:
        while queue and len(running) < jobs:
            name, fn = queue.pop(0)
            path = root / f'result-{name}.json'
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    path.write_text(json.dumps(fn(), default=str))
                except BaseException:  # noqa: BLE001
                    path.write_text(json.dumps({'id': name, 'kind': 'error', 'survived': False, 'lost': {},
                                                'duplicated': {},
                                                'problems': [f'the scenario itself failed:\n'
                                                             f'{traceback.format_exc()}']}))
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (name, path, time.time())
        pid, status = os.wait()
        if pid in running:
            name, path, t0 = running.pop(pid)
            try:
                results[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                results[name] = {'id': name, 'kind': 'error', 'survived': False, 'lost': {}, 'duplicated': {},
                                 'problems': [f'worker died ({os.waitstatus_to_exitcode(status)}) without a result']}
            results[name].setdefault('seconds', round(time.time() - t0, 2))
            print(f"  {name:<28} {'ok' if results[name].get('survived') else 'FAILED'}  "
                  f"{results[name]['seconds']:>6.1f} s", flush=True)
    return [results[name] for name, _ in tasks]


def _faults(p: dict) -> int:
    """Faults injected by a scenario: kills that landed, one per resource fault, none for concurrent runs or skipped
    scenarios."""
    if p.get('skipped'):
        return 0
    return p.get('killed', 0) if p['kind'] == 'kill' else 0 if p['kind'] == 'concurrent' else 1


def _runs(p: dict) -> tuple[int, int]:
    """(runs that ended with correct, complete records, runs that should have): a kill point or fault is one run
    (however often it was killed), a concurrent scenario is its n runs. Kill points whose hook was not reached
    (no fault landed) are left out."""
    if (p['kind'] == 'kill' and not p.get('killed')) or p.get('skipped'):
        return 0, 0
    n = p.get('runs', 1) if p['kind'] == 'concurrent' else 1
    return (n if p.get('survived') else 0), n


def summarize(points: list[dict]) -> dict:
    ok, total = (sum(x) for x in zip(*[_runs(p) for p in points])) if points else (0, 0)
    return {'faults_injected': sum(_faults(p) for p in points), 'runs_survived': ok, 'runs': total,
            'scenarios': len(points), 'runs_failed': [p['id'] for p in points if not p.get('survived')],
            'records_lost': sum(sum(p.get('lost', {}).values()) for p in points),
            'records_duplicated': sum(sum(p.get('duplicated', {}).values()) for p in points),
            'not_reached': [p['id'] for p in points if p['kind'] == 'kill' and not p.get('killed')],
            'skipped': {p['id']: p['skipped'] for p in points if p.get('skipped')}}


def table(points: list[dict]) -> str:
    rows = collections.OrderedDict()
    for p in points:
        key = f"kill -9: {p['category']}" if p['kind'] == 'kill' else p['id']
        r = rows.setdefault(key, [0, 0, 0, 0, 0])
        ok, n = _runs(p)
        for i, v in enumerate((_faults(p), ok, n, sum(p.get('lost', {}).values()),
                               sum(p.get('duplicated', {}).values()))):
            r[i] += v
    lines = [f"{'scenario':<32}{'faults':>8}{'runs ok':>10}{'lost':>7}{'duplicated':>12}", '-' * 69]
    tot = [0, 0, 0, 0, 0]
    for k, (faults, ok, n, lost, dup) in rows.items():
        lines.append(f'{k:<32}{faults:>8}{f"{ok}/{n}":>10}{lost:>7}{dup:>12}')
        tot = [a + b for a, b in zip(tot, (faults, ok, n, lost, dup))]
    lines += ['-' * 69, f"{'total':<32}{tot[0]:>8}{f'{tot[1]}/{tot[2]}':>10}{tot[3]:>7}{tot[4]:>12}"]
    return '\n'.join(lines)


def postgres_url(arg: str | None) -> str | None:
    url = arg or os.environ.get('MEMSPEC_TEST_POSTGRES')
    if url == 'none':
        return None
    try:
        import psycopg2
        psycopg2.connect(url or PG_DEFAULT, connect_timeout=5).close()
        return url or PG_DEFAULT
    except Exception:  # noqa: BLE001
        if url:
            raise SystemExit(f'PostgreSQL at {url} is unreachable')
        return None


