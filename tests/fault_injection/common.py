"""What every part of the fault suite shares: the tiny run it injects faults into and the process set-up (one thread,
offline, torch and the runtime imported once so that every forked run starts warm)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.pop('WORLD_SIZE', None)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)
import runtime.run  # noqa: E402,F401  (imported once here: every forked run starts with torch, sacred, zarr loaded)
from store import memories as _memories  # noqa: E402,F401

SPEC = 'specs/frozen_encoder_curriculum.gin'
STAGES = ('autoencode', 'blank_copy')
BINDINGS = ['Data.vocab_size=300', 'D_MODEL=32', 'N_HEADS=2', 'BATCH=4', 'Stage.eval_every=2', 'Run.eval_batches=1',
            'Run.checkpoint_every=2', 'Run.log_every=1', 'autoencode/Stage.steps=3', 'blank/Stage.steps=3',
            'Plan.curriculum = [@autoencode/Stage(), @blank/Stage()]']
PG_DEFAULT = 'postgresql://memspec:memspec@localhost:5432/postgres'
RUN_TIMEOUT = 600

# hook -> phases at which it can act; categories of kill points
HOOKS = {
    'step': ('begin',), 'eval': ('begin',),
    'ckpt_write': ('begin', 'torn', 'written', 'renamed'), 'torch_save': ('torn',),
    'zarr_open': ('done',), 'zarr_append': ('begin', 'torn', 'done'), 'zarr_close': ('begin', 'done'),
    'zarr_delete': ('torn',),  # only a resumed run replaces a group: not drawn from the baseline's counts
    'db_commit': ('before', 'after'),
}
CATEGORIES = {'mid-step': ('step', 'eval'), 'checkpoint write': ('ckpt_write', 'torch_save'),
              'zarr append': ('zarr_open', 'zarr_append', 'zarr_close'), 'database write': ('db_commit',)}


def argv_for(out_dir: Path, cache: Path, extra=(), bindings=()) -> list[str]:
    argv = [SPEC, '-b', f"Run.out_dir='{out_dir}'", '-b', f"Data.cache_dir='{cache}'"]
    for b in list(BINDINGS) + list(bindings):
        argv += ['-b', b]
    return argv + list(extra)


class Payload:
    """What a crafted checkpoint holds: unpickling it opens (creates) a file, the side effect a code-execution
    payload would have. torch.load(weights_only=True) must refuse it unread."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def M_listing(store):
    from store import memories as M
    return M.listing(store)


