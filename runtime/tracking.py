"""Where a run's metrics go: the run database (Sacred's log_scalar; store/database.py's memspec_metrics) and
TensorBoard event files in the run folder (`<run folder>/tensorboard/`, so `tensorboard --logdir runs/` shows every
run of an out_dir, offline), the same names, steps and values (TensorBoard keeps float32).

Names: train/loss, train/<objective>.loss, train/<objective>.token_accuracy, train/lr (the learning rate of the
update), train/grad_norm (the global gradient norm before clipping to 1.0), train/tokens_per_s (training tokens per
second since the stage started), eval/<objective>.<metric>. Stage ends are text markers (tag 'stages') at their last
step.

Resume: the run database forgets the metrics logged after the checkpoint (runtime.record); the event writer of the
resumed process starts with a purge step (one after the checkpoint), which tells TensorBoard to drop what the killed
process wrote after the checkpoint. The writer is flushed with every checkpoint, so what the checkpoint covers is on
disk in both places.
"""
from __future__ import annotations

from pathlib import Path

# metrics that measure the machine, not the trajectory: a resumed or repeated run gets other values
WALL_CLOCK = ('train/tokens_per_s',)


class Tracker:
    """Logs each metric to Sacred's run (`run.log_scalar`) and, when `folder` is given, to TensorBoard."""

    def __init__(self, run, folder: Path | None, resumed_at: int | None = None):
        self.run, self.writer = run, None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1,
                                        flush_secs=30)

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
