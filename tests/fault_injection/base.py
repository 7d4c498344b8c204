"""The suite itself: the warm-up, the baseline run every fault is compared with, kill points, and the helpers
every scenario uses (finish a run, check it, pause it at a hook, mount a small filesystem)."""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from fault_injection.common import (
    CATEGORIES,
    HOOKS,
    RUN_TIMEOUT,
    argv_for,
)
from fault_injection.hooks import (
    fork_run,
    spawn,
)
from fault_injection.records import (
    compare,
    db_path,
    record_of,
    recorded_ids,
    tail,
)


class SuiteBase:
    """Work folder, data cache, seed and the baseline; kill -9 points and what every scenario does after its fault."""

    def __init__(self, root: Path, cache: Path, seed: int, postgres: str | None = None):
        self.root, self.cache, self.seed, self.postgres = root, cache, seed, postgres
        self.base_dir = root / 'baseline'
        self.base = None
        self.counts: dict = {}

    def warm_up(self) -> float:
        """One plain run in this process before anything is forked: the data cache is built and every lazy import and
        first-call cost is paid once (a forked run then takes ~1 s instead of ~3 s). Threads it leaves (zarr's event
        loop) are stopped so that forks copy a single-threaded process."""
        import contextlib
        import gc

        import tqdm
        import zarr.core.sync

        import runtime.run as R
        tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread, here or in the forks
        t0 = time.perf_counter()
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                R.main(argv_for(self.root / 'warm-up', self.cache))
        except SystemExit as e:
            raise SystemExit(f'the warm-up run failed (exit {e.code}):\n{log.getvalue()[-4000:]}')
        gc.collect()
        zarr.core.sync.cleanup_resources()
        import logging
        for h in list(logging.getLogger().handlers):  # Sacred's basicConfig bound them to the captured stream above
            logging.getLogger().removeHandler(h)
        shutil.rmtree(self.root / 'warm-up', ignore_errors=True)
        return round(time.perf_counter() - t0, 2)

    def baseline(self) -> dict:
        t0 = time.perf_counter()
        code = fork_run(argv_for(self.base_dir, self.cache), self.root / 'baseline.log', None,
                        self.root / 'counts.json')
        if code != 0:
            raise SystemExit(f'the baseline run failed (exit {code}):\n{tail(self.root / "baseline.log", 4000)}')
        self.counts = json.loads((self.root / 'counts.json').read_text())
        unreached = [h for h in HOOKS if h != 'zarr_delete' and not self.counts.get(h)]
        if unreached:  # a hook nobody calls injects nothing: every scenario using it would pass vacuously
            raise SystemExit(f'the baseline run never reached the hook(s) {unreached}: the runtime no longer calls the '
                             'patched function (install_hooks names what it replaces)')
        return {'seconds': round(time.perf_counter() - t0, 2), 'counts': self.counts}

    def base_record(self) -> dict:
        if self.base is None:
            (self.base_id,) = recorded_ids(db_path(self.base_dir))
            self.base = record_of(db_path(self.base_dir), self.base_dir, self.base_id)
            self.base_name = self.base['name']
        return self.base

    def plan_kills(self, n: int) -> list[dict]:
        rng = random.Random(self.seed)
        cats = list(CATEGORIES)
        points = []
        for i in range(n):
            cat = cats[(i + self.seed) % len(cats)]
            hooks = [h for h in CATEGORIES[cat] if self.counts.get(h)]
            specs = []
            for _ in range(2 if rng.random() < 0.25 else 1):  # sometimes the resumed run is killed too
                hook = rng.choice(hooks)
                specs.append({'hook': hook, 'phase': rng.choice(HOOKS[hook]), 'k': rng.randint(1, self.counts[hook]),
                              'action': 'kill'})
                hooks = [h for c in CATEGORIES.values() for h in c if self.counts.get(h)]
            points.append({'id': f'kill{i:02d}', 'kind': 'kill', 'category': cat, 'hooks': specs})
        return points

    def finish(self, out: Path, name: str, resume_id: str | None, extra=(), db=None,
               log: Path | None = None) -> tuple[int, str | None]:
        """Resume (or, when nothing was recorded, rerun) until done -> (exit code, run id). `extra`: more arguments
        (--db), `db` the database they name (default <out>/sacred.db)."""
        more = ['--resume', resume_id] if resume_id is not None else []
        code = fork_run(argv_for(out, self.cache, list(extra) + more), log or out / f'{name}.log')
        ids = recorded_ids(db or db_path(out))
        return code, resume_id if resume_id is not None else (ids[-1] if ids else None)

    def check(self, out: Path, run_id: str | None, db=None) -> tuple[list[str], dict, dict]:
        base = self.base_record()
        if run_id is None:
            return ['no run was recorded'], {'run rows': 1}, {}
        return compare(record_of(db or db_path(out), out, run_id), base, run_id, self.base_id)

    def kill_point(self, point: dict) -> dict:
        out = self.root / point['id']
        res = dict(point, killed=0, survived=False, problems=[], lost={}, duplicated={})
        t0 = time.perf_counter()
        run_id, code = self.kill_runs(out, point['hooks'], res)
        if not res['killed']:
            res['note'] = 'the hook was not reached; no fault injected'
        if not res['problems']:
            if code != 0:
                code, run_id = self.finish(out, 'resume', run_id)
                if code != 0:
                    res['problems'].append(f'resume exited {code}: {tail(out / "resume.log", 800)}')
            if code == 0:
                text = (out / 'resume.log').read_text(errors='replace') if (out / 'resume.log').is_file() else ''
                if 'Traceback' in text:
                    res['problems'].append('the resumed run printed a traceback')
                p, lost, dup = self.check(out, run_id)
                res['problems'] += p
                res['lost'], res['duplicated'] = lost, dup
        res['run_id'] = run_id
        res['survived'] = not res['problems']
        res['seconds'] = round(time.perf_counter() - t0, 2)
        return res

    def kill_runs(self, out: Path, hooks: list[dict], res: dict) -> tuple[str | None, int | None]:
        """The run, killed at each hook in turn (each kill resumed by the next run); -> (run id, last exit code)."""
        run_id, code = None, None
        for j, spec in enumerate(hooks):
            extra = ['--resume', run_id] if run_id is not None else []
            code = fork_run(argv_for(out, self.cache, extra), self.log(out, f'run{j}'), spec)
            ids = recorded_ids(db_path(out))
            if run_id is None and ids:
                run_id = ids[0]
            if code == -signal.SIGKILL:
                res['killed'] += 1
            elif code != 0:
                res['problems'].append(f'run {j} exited {code}: {tail(self.log(out, f"run{j}"), 600)}')
                break
            else:
                break  # finished before the k-th call (the count varies slightly with timing): nothing to resume
        return run_id, code

    @staticmethod
    def log(out: Path, name: str) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return out / f'{name}.log'

    def resume_and_check(self, out: Path, res: dict, run_id, what: str = 'resume', extra=(), db=None,
                         log: Path | None = None) -> dict:
        """The end of every fault scenario: --resume, then compare with the uninterrupted baseline."""
        log = log or out / 'resume.log'
        code, run_id = self.finish(out, 'resume', run_id, extra, db, log)
        if code != 0:
            res['problems'].append(f'{what} exited {code}: {tail(log, 800)}')
        else:
            p, res['lost'], res['duplicated'] = self.check(out, run_id, db)
            res['problems'] += p
        res['survived'] = not res['problems']
        return res

    @staticmethod
    def result(fid: str) -> dict:
        return {'id': fid, 'kind': 'fault', 'problems': [], 'lost': {}, 'duplicated': {}}

    @staticmethod
    def mount(folder: Path, options: str) -> str | None:
        """Mount a tmpfs at `folder` -> None, or why it cannot be mounted here (then the scenario is skipped)."""
        folder.mkdir(parents=True, exist_ok=True)
        if not shutil.which('mount'):
            return 'no mount command on this machine'
        r = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)], capture_output=True,
                           text=True)
        if r.returncode:
            return f"cannot mount a tmpfs here ({(r.stderr.strip() or 'mount failed').splitlines()[0]}; needs root)"
        return None

    @staticmethod
    def umount(folder: Path) -> None:
        subprocess.run(['umount', str(folder)], capture_output=True)

    def pause_at(self, out: Path, hook: str, k: int, log: Path, extra=(),
                 file: str | None = None) -> tuple[int, Path]:
        """A run forked and held at the k-th call of `hook`, counting only writes of `file` when given (_tick); alive,
        its lock held: -> (pid, ready file)."""
        ready = out.parent / f'{out.name}.ready'
        ready.unlink(missing_ok=True)
        spec = {'hook': hook, 'phase': 'begin', 'k': k, 'action': 'pause', 'ready': str(ready)}
        pid = spawn(argv_for(out, self.cache, extra), log, dict(spec, file=file) if file else spec)
        deadline = time.time() + RUN_TIMEOUT
        while not ready.is_file() and time.time() < deadline:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.05)
        return pid, ready

    def checkpoint_verifies(self, d: Path) -> bool:
        import runtime.checkpoint as R
        ck, side = d / 'checkpoint.pt', d / 'checkpoint.pt.sha256'
        return ck.is_file() and side.is_file() and R.sha256_file(ck) in side.read_text().split()
