"""Runs with pretrained backbones (specs/pretrained/ against tiny models): what a run stores, resume after a kill,
and the export whose adapter peft loads onto the base model."""
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import ROOT, rt_argv, rt_env, rt_main, rt_run_dir, rt_run_ids
from safetensors import safe_open
from safetensors.torch import load_file

from compiler.digest import sha256_file

ICAE = 'specs/pretrained/icae_autoencoder.gin'
COPY = 'specs/pretrained/llama_copy_memory.gin'
SMALL = ['Data.batch_size=4', 'Memory.chunk_len=16', 'Run.eval_batches=1', 'Run.memory_store="none"']


@pytest.fixture(scope='module')
def llama(tiny_models):
    return tiny_models('llama')


@pytest.fixture(scope='module')
def icae(llama, tmp_path_factory):
    """A 3-step ICAE run, exported."""
    from store import export as E
    tmp = tmp_path_factory.mktemp('icae')
    argv = rt_argv(ICAE, tmp / 'runs', tmp / 'cache', [f"LLAMA='{llama}'", 'ae/Stage.steps=3', 'ae/Stage.eval_every=3',
                                                        'ae/Stage.lr=1e-2', *SMALL])
    assert rt_main(argv) == 0
    (run_id,) = rt_run_ids(tmp / 'runs')
    out = tmp / 'export'
    E.main([run_id, str(out), '--db', f"sqlite:///{tmp / 'runs' / 'sacred.db'}"])
    return SimpleNamespace(dir=rt_run_dir(tmp / 'runs', run_id), out=out)


def test_run_weights_hold_the_adapters_and_memspec_parameters_and_name_the_base(icae, llama):
    import json
    final = load_file(icae.dir / 'final.safetensors')
    assert final and all('.lora_' in k or k.startswith('memory.') for k in final), sorted(final)
    assert any(k.startswith('memory.') for k in final)
    base = json.loads((icae.out / 'config.json').read_text())['backbones']['encoder']
    assert base['source'] == llama and base['adapter'] == 'peft/encoder'
    assert base['sha256'] == {'model.safetensors': sha256_file(f'{llama}/model.safetensors')}


def test_the_exported_adapter_loads_with_peft_onto_the_base_with_the_same_logits(icae, llama):
    from peft import PeftModel

    from compiler.load import from_pretrained
    ours = from_pretrained(icae.out).encoder
    base = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(input_ids=tokens).logits
        peft = PeftModel.from_pretrained(base, icae.out / 'peft' / 'encoder').eval()
        theirs = peft(input_ids=tokens).logits
        mine = ours.head(ours(tokens))
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()
    assert not torch.allclose(mine, plain, atol=1e-4), 'the trained adapter should change the logits'


# SIGKILL as the 4th training step starts: the checkpoint is from step 2 (Run.checkpoint_every = 2)
KILLER = """
import os, signal, sys
import runtime.run
import runtime.train as T
calls, real = [0], T.stage_loss
def stage_loss(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 4 and args[0].training:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
T.stage_loss = stage_loss
runtime.run.main(sys.argv[1:])
"""


COPY_BINDINGS = ['copy/Stage.steps=5', 'copy/Stage.eval_every=5', 'Run.checkpoint_every=2', 'encoder/Stack.d_model=32',
                 'encoder/Stack.n_layers=1', *SMALL]


@pytest.fixture(scope='module')
def copy_run(llama, tmp_path_factory):
    """An uninterrupted 5-step run of a frozen Llama decoder with LoRA reading a memspec encoder."""
    tmp = tmp_path_factory.mktemp('copy')
    argv = rt_argv(COPY, tmp / 'a', tmp / 'cache', [f"LLAMA='{llama}'", *COPY_BINDINGS])
    assert rt_main(argv) == 0
    (run_id,) = rt_run_ids(tmp / 'a')
    return SimpleNamespace(dir=rt_run_dir(tmp / 'a', run_id), cache=tmp / 'cache')


def test_resume_after_a_kill_continues_the_same_trajectory(llama, copy_run, tmp_path):
    """Killed mid-stage and resumed, the run ends with the weights of the uninterrupted one."""
    out_b = tmp_path / 'b'
    argv_b = rt_argv(COPY, out_b, copy_run.cache, [f"LLAMA='{llama}'", *COPY_BINDINGS])
    killed = subprocess.run([sys.executable, '-c', KILLER, *argv_b], cwd=ROOT, env=rt_env(), capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (b_id,) = rt_run_ids(out_b)
    ck = torch.load(rt_run_dir(out_b, b_id) / 'checkpoint.pt', weights_only=True)
    assert (ck['stage'], ck['step']) == (0, 2)
    shards = rt_run_dir(out_b, b_id) / ck['shards']['dir']  # the model's and optimizer's tensors (runtime/sharded.py)
    stored = [k for f in sorted(shards.glob('*.safetensors')) for k in safe_open(f, 'pt').keys()]
    assert any('lora_A' in k for k in stored), stored
    assert not any('base_layer' in k or 'embed_tokens' in k for k in stored), 'the frozen base is not stored'
    assert rt_main(argv_b + ['--resume', b_id]) == 0
    fa, fb = (load_file(d / 'final.safetensors') for d in (copy_run.dir, rt_run_dir(out_b, b_id)))
    assert fa.keys() == fb.keys() and any('lora_B' in k for k in fa)
    for k in fa:
        assert torch.allclose(fa[k], fb[k], rtol=0, atol=1e-6), f'{k} differs after resume'
    assert any(not torch.all(v == 0) for k, v in fa.items() if 'lora_B' in k), 'the adapters trained'


def test_generation_and_the_lm_eval_adapter_read_a_backbone_run(copy_run, capsys):
    """runtime.generate decodes from the run folder; the harness adapter's log-likelihood equals the forward pass."""
    from conftest import in_process

    from runtime import generate as G
    code, out, err = in_process(G.main, [copy_run.dir, '--prompt', 'The quick brown', '--context',
                                         'Memory models compress each chunk of text.', '--max-new-tokens', '6'],
                                capsys)
    assert code == 0 and '1 x 6 tokens' in err, err
    pytest.importorskip('lm_eval')
    import runtime.lm_adapter as A
    lm = A.MemspecLM(run=str(copy_run.dir), device='cpu', batch_size=4)
    from lm_eval.api.instance import Instance
    ctx, cont = 'Memory models compress', ' each chunk'
    (res,) = lm.loglikelihood([Instance(request_type='loglikelihood', doc={}, arguments=(ctx, cont), idx=0)])
    c, k = lm._encode_pair(ctx, cont)
    n, l = lm.plan.memory.chunks, lm.plan.memory.chunk_len
    seq = torch.zeros(1, n * l, dtype=torch.long)
    seq[0, :len(c) + len(k)] = torch.tensor(c + k)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(seq.view(1, n, l)).flatten(1, 2)[0], -1)
    want = lp[torch.arange(len(c) - 1, len(c) + len(k) - 1), torch.tensor(k)].sum()
    torch.testing.assert_close(torch.tensor(res[0]), want, atol=1e-5, rtol=1e-5)


def test_an_export_refuses_a_base_model_other_than_the_one_trained_on(icae, tmp_path):
    import json
    import shutil

    from compiler.errors import UserError
    from compiler.load import from_pretrained
    out = tmp_path / 'export'
    shutil.copytree(icae.out, out)
    cfg = json.loads((out / 'config.json').read_text())
    cfg['backbones']['encoder']['sha256'] = {'model.safetensors': '0' * 64}
    (out / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(UserError, match='is not the one the run trained on'):
        from_pretrained(out)
