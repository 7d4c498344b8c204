"""Where a run's metrics go: the run database (Sacred's log_scalar; store/database.py's memspec_metrics) and
TensorBoard event files in the run folder (`<run folder>/tensorboard/`, so `tensorboard --logdir runs/` shows every
run of an out_dir, offline), the same names, steps and values (TensorBoard keeps float32).

Names: train/loss, train/<objective>.loss, train/<objective>.token_accuracy, train/lr (the learning rate of the
update), train/grad_norm (the global gradient norm before clipping to 1.0), train/tokens_per_s (training tokens per
second since the stage started), eval/<objective>.<metric>. Stage ends are text markers (tag 'stages') at their last
step.

Resume: the run database forgets the metrics logged after the checkpoint (runtime.record); the event writer of any
later process of a run (its folder already holds event files) starts with a purge step, one after the checkpoint's
step, or 0 when the run is resumed from its start (killed before its first checkpoint), which tells TensorBoard to
drop what the killed process wrote after the checkpoint. The writer is flushed with every checkpoint, so what the
checkpoint covers is on disk in both places.

HParams: every run's events carry its configuration for TensorBoard's HParams tab (filter and sort runs by config):
the plan's scalar fields (`memory.chunks`, `curriculum.blank_copy.lr`, ...), the seed and plan hash, and a sweep
member's grid point (`grid.<key>`), with train/loss and each objective's held-out CE as the metrics.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from store.database import flatten
from store.files import refuse_link

# metrics that measure the machine, not the trajectory: a resumed or repeated run gets other values
WALL_CLOCK = ('train/tokens_per_s',)


class Tracker:
    """Logs each metric to Sacred's run (`run.log_scalar`) and, when `folder` is given, to TensorBoard."""

    def __init__(self, run, folder: Path | None, resumed_at: int | None = None):
        self.run, self.writer = run, None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            refuse_link(folder)  # a planted link would put the event files wherever it points
            earlier = Path(folder).is_dir() and any(Path(folder).glob('events.out.tfevents.*'))
            purge = resumed_at + 1 if resumed_at is not None else 0 if earlier else None
            if earlier:
                _after_earlier_files(Path(folder))
            self.writer = SummaryWriter(str(folder), purge_step=purge, flush_secs=30)
            self.hparams(getattr(run, 'config', None) or {})

    def hparams(self, config: dict) -> None:
        """The run's configuration as TensorBoard HParams, in this run's own event file (SummaryWriter.add_hparams
        would start a sub-run of its own)."""
        from torch.utils.tensorboard.summary import hparams
        values = hparam_values(config)
        if not values:
            return
        kinds = sorted({o.get('kind') for s in (config.get('plan') or {}).get('curriculum') or []
                        for o in s.get('objectives') or [] if isinstance(o, dict) and o.get('kind')})
        metrics = {'train/loss': 0.0, **{f'eval/{k}.ce': 0.0 for k in kinds}}
        for summary in hparams(values, metrics):
            self.writer.file_writer.add_summary(summary)

    def scalar(self, name: str, value: float, step: int) -> None:
        self.run.log_scalar(name, value, step)
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def stage_end(self, index: int, count: int, name: str, first: int, last: int) -> None:
        """A text marker at a stage's last step (TensorBoard's Text tab, and the step it names)."""
        if self.writer is not None:
            self.writer.add_text('stages', f'stage {index + 1}/{count} `{name}` ended: steps {first}-{last}', last)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _after_earlier_files(folder: Path) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second it was created in: a
    later process that starts within the second of an earlier one's file (a kill and an immediate resume) could sort
    before it, and its purge step would then apply before the events it should drop. Wait into the next second (at
    most about a second; a file stamped further ahead, by a clock that moved back, is not waited for)."""
    stamps = [int(p.name.split('.')[3]) for p in folder.glob('events.out.tfevents.*')
              if len(p.name.split('.')) > 3 and p.name.split('.')[3].isdigit()]
    newest = max(stamps, default=None)
    while newest is not None and newest - 1 <= int(time.time()) <= newest:
        time.sleep(0.05)


def hparam_values(config: dict) -> dict:
    """{name: int | float | str | bool}: the plan's scalar fields (lists and None as text), the seed, the plan hash
    and a sweep member's grid point."""
    out: dict = {}
    for key, value in flatten(config.get('plan') or {}).items():
        out[key] = _scalar(value)
    for key in ('seed', 'spec_hash'):
        if config.get(key) is not None:
            out[key] = config[key]
    sweep = config.get('sweep') or {}
    for key, value in (sweep.get('grid') or {}).items():  # recorded with ':' for '.' (runtime.sweep.stored)
        out[f"grid.{key.replace(':', '.')}"] = _scalar(value)
    if sweep.get('name'):
        out['sweep'] = str(sweep['name'])
    return out


def _scalar(value):
    """What HParams can hold: a number, text or true/false; lists, dicts and None as JSON text."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
