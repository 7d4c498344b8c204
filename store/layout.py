"""Where a run's files live: the one place that knows the run-folder layout, how runs are named on disk and the
memory store's default path.

    <Run.out_dir>/sacred.db                    the default run database (store/database.py)
    <Run.out_dir>/memories.zarr                the default memory store (Run.memory_store overrides it)
    <Run.out_dir>/<id>-<key>/run.json          the marker: {run_id, run_key, database, provenance} of the run that owns
                                               the folder (provenance: runtime/provenance.py)
    <Run.out_dir>/<id>-<key>/run.lock          held (fcntl.flock) by the process training the run
    <Run.out_dir>/<id>-<key>/operative.gin     the complete spec the run was compiled from
    <Run.out_dir>/<id>-<key>/checkpoint.pt     the latest resume point (+ checkpoint.pt.sha256)
    <Run.out_dir>/<id>-<key>/stages/<stage>.safetensors   weights at each stage end (what init_from 'run:' reads)
    <Run.out_dir>/<id>-<key>/final.safetensors the final weights (the database holds their path and sha256)
    <Run.out_dir>/<id>-<key>/tokenizer.json    a copy of the run's tokenizer (readers need no data cache)
    <Run.out_dir>/<id>-<key>/tensorboard/      TensorBoard event files of every metric (runtime/tracking.py)
    <Run.out_dir>/<id>-<key>/source.diff       uncommitted changes of the code that ran (only when there were any)
    <Run.out_dir>/<id>-<key>/summary.md, summary.json     stage-end metrics
    <store>/<id>-<key>/<stage>/...             the run's memories (store/memories.py)

Run names. A run id is unique only within its database (Sacred counts 0, 1, 2, ... per database), so two databases
sharing an out_dir, or two out_dirs sharing a memory store, would both have a run 0. Every run therefore gets a run
key (RUN_KEY_HEX random hex digits) when it is first recorded; the key is recorded with the run (Sacred
`info.run_key`) and in the folder's marker, and the run's folder and memory group are named `<id>-<key>`. Users still
name runs by id: `resolve` finds the folder or group whose name starts with that id, and refuses an id that matches
several (listing them) instead of picking one. Folders named by the id alone were written before run keys existed;
they are read (a unique match) but never written.

Names that become paths are checked here: a run reference must be an id or an `<id>-<key>` name (no separators, no
'..'), and a stage name a plain file name (check_stage_name), so no value of a spec can name a path outside the
run's folder.
"""
from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from compiler.digest import sha256_file
from compiler.errors import UserError
from compiler.plan import NAME

MEMORY_STORE = 'memories.zarr'
RUN_KEY_HEX = 10  # 40 random bits: two runs sharing a folder or store group would need the same id and key
_ID = r'\d{1,18}'
_NAME = re.compile(rf'^({_ID})-([0-9a-f]{{{RUN_KEY_HEX}}})$')
_LEGACY = re.compile(rf'^({_ID})$')


def check_stage_name(stage: str, where: str) -> None:
    """A stage name becomes a file name (stages/<stage>.safetensors) and a store group: it must be a name
    (compiler.plan.NAME, what the validator requires of Stage.name) that cannot leave the run's folder. Checked
    again here because plans also come from records (Plan.from_dict), which no validator has seen."""
    if not isinstance(stage, str) or not NAME.match(stage):
        raise UserError(where, f'stage name {stage!r} cannot be a file name (it becomes stages/<name>.safetensors '
                        'and a memory-store group)', "use letters, digits and '_', e.g. 'blank_copy'")


def new_run_key() -> str:
    return secrets.token_hex(RUN_KEY_HEX // 2)


def is_run_key(key) -> bool:
    return isinstance(key, str) and re.fullmatch(f'[0-9a-f]{{{RUN_KEY_HEX}}}', key) is not None


def run_name(run_id, key: str | None) -> str:
    """The name of a run's folder and memory group: '<id>-<key>' ('<id>' for a run recorded before run keys)."""
    return str(run_id) if key is None else f'{run_id}-{key}'


def parse_name(name: str) -> tuple[str, str | None] | None:
    """'<id>-<key>' -> (id, key); '<id>' (written before run keys) -> (id, None); anything else -> None."""
    m = _NAME.match(name)
    if m:
        return m.group(1), m.group(2)
    m = _LEGACY.match(name)
    return (m.group(1), None) if m else None


def check_reference(ref: str, where: str) -> None:
    """A run as a user names it: an id ('3') or a run name ('3-1a2b3c4d5e'), never a path."""
    if parse_name(str(ref)) is None:
        raise UserError(where, f'{ref!r} is not a run id',
                        'give the run id (a number, e.g. 3; python -m store.runs list) or its full name '
                        f'<id>-<key> (e.g. 3-{"0" * RUN_KEY_HEX}); paths are not accepted')


def matching(names, ref: str) -> list[str]:
    """The run names among `names` that `ref` (an id or a full name) denotes."""
    ref = str(ref)
    parsed = parse_name(ref)
    if parsed is None:
        return []
    if parsed[1] is not None:
        return [n for n in names if n == ref]
    return sorted((n for n in names if (parse_name(n) or (None,))[0] == ref), key=lambda n: (n != ref, n))


def resolve(names, ref: str, where: str, what: str, pick: str) -> str | None:
    """The one run name `ref` denotes among `names` (None: none); several -> UserError listing them. `what` says what
    holds them ('under runs/'), `pick` how else to choose (e.g. 'or pass --db')."""
    found = matching(names, ref)
    if len(found) > 1:
        raise UserError(where, f'run id {ref} is ambiguous: {len(found)} runs with this id {what} '
                        f"({', '.join(found)}; runs recorded in different databases)",
                        f'give the full name, e.g. {found[0]}, {pick}')
    return found[0] if found else None


class RunFolder:
    """The files of one run under its out_dir."""

    def __init__(self, out_dir, run_id, key: str | None):
        self.out_dir, self.run_id, self.key = Path(out_dir), str(run_id), key
        self.name = run_name(run_id, key)
        self.root = self.out_dir / self.name

    @classmethod
    def at(cls, folder) -> RunFolder:
        """The layout of an existing run folder given by its path (named '<id>-<key>', or '<id>' before run keys;
        folders of other names, e.g. a test's scratch folder, keep their name as the id)."""
        folder = Path(folder)
        run_id, key = parse_name(folder.name) or (folder.name, None)
        self = cls(folder.parent, run_id, key)
        self.name, self.root = folder.name, folder
        return self

    @classmethod
    def find(cls, out_dir, ref: str, where: str, pick: str = 'or the path of its folder') -> RunFolder | None:
        """The run folder under out_dir that `ref` (an id or a full name) denotes; None when there is none."""
        check_reference(ref, where)
        out_dir = Path(out_dir)
        names = [p.name for p in out_dir.iterdir() if p.is_dir()] if out_dir.is_dir() else []
        name = resolve(names, ref, where, f'under {out_dir}', pick)
        return None if name is None else cls.at(out_dir / name)

    @property
    def marker(self) -> Path:
        return self.root / 'run.json'

    @property
    def lock(self) -> Path:
        return self.root / 'run.lock'

    def owner(self) -> dict | None:
        """The marker's {run_id, run_key} (None: no marker, or unreadable)."""
        try:
            owner = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    @property
    def operative(self) -> Path:
        return self.root / 'operative.gin'

    @property
    def checkpoint(self) -> Path:
        return self.root / 'checkpoint.pt'

    @property
    def stages(self) -> Path:
        return self.root / 'stages'

    def stage_weights(self, stage: str) -> Path:
        check_stage_name(stage, f'Stage.name {stage!r}')
        return self.stages / f'{stage}.safetensors'

    @property
    def final(self) -> Path:
        return self.root / 'final.safetensors'

    def weights(self, stage: str | None = None) -> Path:
        """A stage's end weights, or the final ones."""
        return self.final if stage is None else self.stage_weights(stage)

    @property
    def tokenizer(self) -> Path:
        """A copy of the run's tokenizer: generation and analysis from anywhere need no data cache."""
        return self.root / 'tokenizer.json'

    @property
    def tensorboard(self) -> Path:
        """The run's TensorBoard event files (runtime/tracking.py)."""
        return self.root / 'tensorboard'

    @property
    def source_diff(self) -> Path:
        """The uncommitted changes of the code that ran (runtime/provenance.py), when there were any."""
        return self.root / 'source.diff'

    @property
    def summary_md(self) -> Path:
        return self.root / 'summary.md'

    @property
    def summary_json(self) -> Path:
        return self.root / 'summary.json'

    def written(self) -> list[Path]:
        """Every path a run creates or replaces in its folder. memspec makes no links there, so a link at any of them
        was planted, and is refused before a resume writes anything (store.files.refuse_link)."""
        fixed = [self.root, self.lock, self.marker, self.operative, self.checkpoint,
                 self.checkpoint.with_name(self.checkpoint.name + '.sha256'), self.stages, self.final, self.tokenizer,
                 self.tensorboard, self.source_diff, self.summary_md, self.summary_json]
        return fixed + (sorted(self.stages.iterdir()) if self.stages.is_dir() and not self.stages.is_symlink() else [])


def file_ref(path) -> dict:
    """A file as a run records it (its weights, init_from sources): where it is, its size and its sha256. The bytes
    stay in the file; the database holds the reference."""
    path = Path(path)
    return {'path': str(path.resolve()), 'bytes': path.stat().st_size, 'sha256': sha256_file(path)}


def memory_store(run_cfg, out_dir=None) -> Path | None:
    """Where a run with these Run settings writes held-out memories (None: nowhere); `out_dir` overrides
    Run.out_dir (a run folder found elsewhere than where it was written). Whether its family stores memories at all
    is the family record's business (runtime.run asks both)."""
    if run_cfg.memory_store == 'none':
        return None
    return Path(run_cfg.memory_store or Path(out_dir or run_cfg.out_dir) / MEMORY_STORE)
