"""Where a run's files live: the one place that knows the run-folder layout and the memory store's default path.

    <Run.out_dir>/sacred.db                    the default run database (store/database.py)
    <Run.out_dir>/memories.zarr                the default memory store (Run.memory_store overrides it)
    <Run.out_dir>/<run>/operative.gin          the complete spec the run was compiled from
    <Run.out_dir>/<run>/checkpoint.pt          the latest resume point (+ checkpoint.pt.sha256)
    <Run.out_dir>/<run>/stages/<stage>.safetensors   weights at each stage end (what init_from 'run:' reads)
    <Run.out_dir>/<run>/final.safetensors      the final weights
    <Run.out_dir>/<run>/summary.md, summary.json     stage-end metrics

Stage names become file names here only after the validator has checked them.
"""
from __future__ import annotations

from pathlib import Path

MEMORY_STORE = 'memories.zarr'


class RunFolder:
    """The files of one run under its out_dir."""

    def __init__(self, out_dir, run: str):
        self.out_dir, self.run = Path(out_dir), str(run)
        self.root = self.out_dir / self.run

    @classmethod
    def at(cls, folder) -> RunFolder:
        """The layout of an existing run folder given by its path."""
        folder = Path(folder)
        return cls(folder.parent, folder.name)

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
        return self.stages / f'{stage}.safetensors'

    @property
    def final(self) -> Path:
        return self.root / 'final.safetensors'

    def weights(self, stage: str | None = None) -> Path:
        """A stage's end weights, or the final ones."""
        return self.final if stage is None else self.stage_weights(stage)

    @property
    def summary_md(self) -> Path:
        return self.root / 'summary.md'

    @property
    def summary_json(self) -> Path:
        return self.root / 'summary.json'


def memory_store(run_cfg, out_dir=None) -> Path | None:
    """Where a run with these Run settings writes held-out memories (None: nowhere); `out_dir` overrides
    Run.out_dir (a run folder found elsewhere than where it was written). Whether its family stores memories at all
    is the family record's business (runtime.run asks both)."""
    if run_cfg.memory_store == 'none':
        return None
    return Path(run_cfg.memory_store or Path(out_dir or run_cfg.out_dir) / MEMORY_STORE)
