"""What produced a run, recorded with it (Sacred config 'provenance' and the run folder's run.json):

- the code: the git commit of the project and the diff of every uncommitted change to a tracked file (`git diff
  HEAD`; 'dirty' means this diff is not empty), plus the path and sha256 of each untracked file git does not ignore
  (listed, never counted as a change: scratch files beside the code are common), or, where the project is not a
  git checkout (an installed copy, an unpacked archive), a sha256 over the files of
  compiler/, runtime/, store/ and specs/;
- the seed (Run.seed, which Sacred also records as its own seed);
- the sha256 of every file a stage's init_from reads (another run's stage weights, a Llama checkpoint).

Files are referenced by path, size and sha256 (store.layout.file_ref), which is also how a run records its weights:
the files stay in the run folder and the database holds their hashes, not their bytes.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from compiler.digest import sha256_file
from compiler.llama import llama_files
from runtime.checkpoint import run_source
from store.layout import file_ref

ROOT = Path(__file__).resolve().parent.parent
TREE = ('compiler', 'runtime', 'store', 'specs')  # what a source-tree hash covers
DIFF_LIMIT = 1 << 20  # bytes of diff recorded in the database; a longer one is in the run folder only
UNTRACKED_LIMIT = 200  # untracked files listed (with their sha256)


def _git(root: Path, *args: str) -> str:
    return subprocess.run(['git', '-C', str(root), '-c', 'core.quotepath=off', *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout


def git_state(root: Path = ROOT) -> tuple[dict | None, str]:
    """({'kind': 'git', commit, branch, dirty, diff, diff_sha256, diff_bytes, untracked}, the diff text), or (None,
    why not) when `root` is not the top of a git checkout git can read."""
    try:
        top = _git(root, 'rev-parse', '--show-toplevel').strip()
        if Path(top).resolve() != root.resolve():  # e.g. an installed copy inside someone else's repository
            return None, f'{root} is not the top of a git checkout (that is {top})'
        commit = _git(root, 'rev-parse', 'HEAD').strip()
        branch = _git(root, 'rev-parse', '--abbrev-ref', 'HEAD').strip()
        diff = _git(root, 'diff', 'HEAD', '--no-ext-diff', '--no-color')
        untracked = [p for p in _git(root, 'ls-files', '--others', '--exclude-standard', '-z').split('\0') if p]
    except FileNotFoundError:
        return None, 'git is not installed'
    except subprocess.CalledProcessError as e:
        return None, f"git could not read {root}: {(e.stderr or '').strip().splitlines()[0] if e.stderr else e}"
    except subprocess.TimeoutExpired:
        return None, 'git did not answer within 60 s'
    files = [{'path': p, 'sha256': sha256_file(root / p)} for p in sorted(untracked)[:UNTRACKED_LIMIT]
             if (root / p).is_file()]
    raw = diff.encode()
    state = {'kind': 'git', 'commit': commit, 'branch': branch, 'dirty': bool(diff),
             'diff_sha256': hashlib.sha256(raw).hexdigest(), 'diff_bytes': len(raw),
             'diff': diff if len(raw) <= DIFF_LIMIT else None, 'untracked': files,
             'untracked_more': max(0, len(untracked) - UNTRACKED_LIMIT)}
    return state, diff


def tree_hash(root: Path = ROOT) -> tuple[str, int]:
    """sha256 over (relative path, sha256 of the file) of every file under TREE (caches excluded), and the count."""
    h, n = hashlib.sha256(), 0
    for folder in TREE:
        for p in sorted((root / folder).rglob('*')) if (root / folder).is_dir() else []:
            if p.is_file() and '__pycache__' not in p.parts and p.suffix != '.pyc':
                h.update(f'{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n'.encode())
                n += 1
    return h.hexdigest(), n


def source_state(root: Path = ROOT) -> tuple[dict, str]:
    """The code a run ran (see the module doc) and the uncommitted diff ('' when clean or not a checkout)."""
    state, diff = git_state(root)
    if state is not None:
        return state, diff
    digest, n = tree_hash(root)
    return {'kind': 'tree', 'sha256': digest, 'files': n, 'covers': list(TREE), 'why_not_git': diff}, ''


def init_sources(plan, runs_dir: Path, first_stage: int = 0) -> dict:
    """{stage: {component: {'source': ..., 'files': [file_ref, ...]}}} for every init_from of the stages from
    `first_stage` on that reads files (sources were checked to exist by runtime.checkpoint.check_init_sources)."""
    out: dict = {}
    for stage in plan.curriculum[first_stage:]:
        for comp, src in stage.init_from.items():
            if src.startswith('run:'):
                paths = [run_source(runs_dir, src)[0]]
            elif src.startswith('llama:'):
                paths = llama_files(src[len('llama:'):])
            else:
                continue
            out.setdefault(stage.name, {})[comp.replace('.', ':')] = {'source': src,
                                                                      'files': [file_ref(p) for p in paths]}
    return out
