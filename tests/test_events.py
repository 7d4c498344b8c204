"""TensorBoard events as TensorBoard reads them (runtime/tracking.py): a later process of a run purges what the killed
one logged after the checkpoint, also when the run restarts from its start (no checkpoint yet); every run carries
its configuration as HParams."""
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from runtime.tracking import Tracker, hparam_values

CONFIG = {'plan': {'family': 'memory', 'memory': {'chunks': 4, 'chunk_len': 8},
                   'curriculum': [{'name': 'copy', 'lr': 0.002, 'freeze': ['encoder'],
                                   'objectives': [{'kind': 'copy', 'weight': 1.0}]}]},
          'seed': 3, 'spec_hash': 'abc123',
          'sweep': {'name': 'probes', 'grid': {'Memory:chunks': 4}}}  # grid keys as runtime.sweep records them


def fake_run(config=CONFIG):
    return types.SimpleNamespace(config=config, log_scalar=lambda *a: None)


def process(folder, steps, value, resumed_at=None, started=None):
    """One process of a run: logs train/loss = value + step / 100 at `steps`, then dies (closes its writer).
    `started`: its start time, which names its event file (files are read in name order; two writers of one test
    process in the same second would be ordered by a counter, as text)."""
    import time
    real = time.time
    time.time = (lambda: started) if started is not None else real
    try:
        t = Tracker(fake_run(), folder, resumed_at)
    finally:
        time.time = real
    for s in steps:
        t.scalar('train/loss', value + s / 100, s)
    t.close()


def losses(folder) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0})
    acc.Reload()
    return [(e.step, round(e.value, 4)) for e in acc.Scalars('train/loss')]


@pytest.mark.parametrize('checkpoint', [None, 0, 4])
def test_a_later_process_purges_what_the_killed_one_logged_after_the_checkpoint(tmp_path, checkpoint):
    """The killed process got to step 10; the next one continues after the checkpoint (None: there was none, so it
    starts over) and gets to step 12: TensorBoard shows each step once, each from the process that counts."""
    first = 1 if checkpoint is None else checkpoint + 1
    process(tmp_path, range(1, 11), 1.0, started=1_700_000_000)
    process(tmp_path, range(first, 13), 2.0, checkpoint, started=1_700_000_060)
    got = losses(tmp_path)
    assert [s for s, _ in got] == list(range(1, 13))
    assert got == [(s, round((1.0 if s < first else 2.0) + s / 100, 4)) for s in range(1, 13)]


def test_a_first_process_purges_nothing(tmp_path):
    process(tmp_path / 'a', range(1, 4), 1.0)
    process(tmp_path / 'b', range(1, 4), 1.0)
    assert losses(tmp_path / 'a') == losses(tmp_path / 'b') == [(1, 1.01), (2, 1.02), (3, 1.03)]


def hparams_of(folder) -> dict:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent('hparams')
    start = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/experiment'])
    values = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind'))
              for k, v in start.session_start_info.hparams.items()}
    metrics = [m.name.tag for m in experiment.experiment.metric_infos]
    return {'values': values, 'metrics': metrics}


def test_every_run_carries_its_configuration_as_hparams(tmp_path):
    process(tmp_path, [1], 1.0)
    got = hparams_of(tmp_path)
    assert got['values'] == {'family': 'memory', 'memory.chunks': 4.0, 'memory.chunk_len': 8.0,
                             'curriculum.copy.name': 'copy', 'curriculum.copy.lr': 0.002,
                             'curriculum.copy.freeze': '["encoder"]', 'curriculum.copy.objectives.copy.kind': 'copy',
                             'curriculum.copy.objectives.copy.weight': 1.0, 'seed': 3.0, 'spec_hash': 'abc123',
                             'grid.Memory.chunks': 4.0, 'sweep': 'probes'}
    assert got['metrics'] == ['train/loss', 'eval/copy.ce']
    assert hparam_values({}) == {}


def test_a_real_run_has_hparams_with_its_plan(stored_run):
    got = hparams_of(stored_run.run_dir / 'tensorboard')
    assert got['values']['memory.chunks'] > 0 and got['values']['family'] == 'memory', got['values']
    assert 'curriculum.blank_copy.lr' in got['values'] and 'train/loss' in got['metrics']
