"""docs/paper.md's table of the research code's values against the compiled plans of specs/paper/: each row's value is
the plan's, and the spec line it names sets it. Paper specs also run at CPU scale (a shrunken copy, a few steps)."""
import ast
import re

import pytest
from conftest import ROOT, rt_argv, rt_main, rt_run_ids

from compiler.spec import SPECS_DIR, load

HEADER = '| spec | plan value | value | spec line | research code |'


def table_rows() -> list[tuple[str, str, str, str]]:
    lines = (ROOT / 'docs' / 'paper.md').read_text().splitlines()
    start = lines.index(HEADER) + 2  # the header, then the |---| row
    rows = []
    for line in lines[start:]:
        if not line.startswith('|'):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows.append(tuple(cells[:4]))
    return rows


def resolve(plan: dict, path: str):
    """A table path ('decoder.n_heads', 'curriculum[combined].objectives[blank_copy].delimiter') in plan.to_dict()."""
    node = plan
    for part in re.findall(r'[a-z_]+(?:\[[a-z_]+\])?', path):
        name, _, key = part.partition('[')
        node = node[name]
        if key:
            field = 'name' if name == 'curriculum' else 'kind'
            (node,) = [x for x in node if x[field] == key[:-1]]
    return node


ROWS = table_rows()


def test_the_table_covers_every_paper_experiment():
    assert len(ROWS) >= 50
    assert {r[0] for r in ROWS} == {'paper/frozen_encoder_curriculum.gin', 'paper/memory_combined.gin',
                                    'paper/memory_clm.gin', 'paper/clm.gin', 'paper/autoencoder.gin',
                                    'paper/oracle_memory.gin'}


@pytest.mark.parametrize('spec', sorted({r[0] for r in ROWS}))
def test_each_value_is_the_compiled_plans_and_its_spec_line_sets_it(spec):
    plan = load([SPECS_DIR / spec], devices=8).plan.to_dict()
    for _, path, value, where in (r for r in ROWS if r[0] == spec):
        expected = ast.literal_eval(value)
        assert resolve(plan, path) == expected, (spec, path)
        file, line = where.rsplit(':', 1)
        text = (ROOT / file).read_text().splitlines()[int(line) - 1]
        assert value in text.split('#')[0], (where, text, value)


# the paper specs at CPU scale: the same schedule, objectives and normalisation, tiny stacks and a few steps
SHRINK = ['Data.source = "embedded"', 'Data.vocab_size = 300', 'D_MODEL = 32', 'N_LAYERS = 1', 'N_HEADS = 2',
          'CHUNK_LEN = 8', 'BATCH = 4', 'Stack.attention = "sdpa"', 'Run.steps_scale = 2e-5', 'Run.eval_batches = 1',
          'Run.log_every = 1', "Run.memory_store = 'none'", 'Run.device = "cpu"']


@pytest.mark.parametrize('spec, extra', [
    ('paper/frozen_encoder_curriculum.gin', ['encoder/Stack.n_layers = 1', 'encoder/Stack.n_heads = 2',
                                             'ae_decoder/Stack.n_layers = 1', 'ae_decoder/Stack.n_heads = 2',
                                             'autoencode/Stage.batch_size = 2']),
    ('paper/memory_combined.gin', [])])
def test_paper_specs_run_at_cpu_scale(spec, extra, tmp_path, rt_cache):
    out = tmp_path / 'runs'
    bindings = SHRINK + extra
    plan = load([SPECS_DIR / spec], bindings).plan
    assert all(s.steps <= 4 for s in plan.curriculum)
    assert rt_main(rt_argv(f'specs/{spec}', out, rt_cache, bindings)) == 0
    assert len(rt_run_ids(out)) == 1


def test_the_stage_end_copy_eval_scores_blank_copy_with_the_stages_delimiter():
    """The paper's Copy Eval: blank copy with the 3 delimiter tokens the combined stage trains with, token accuracy
    over the supervised (copied) positions, pooled over the batch as the research code's `hamming` pools them."""
    import torch

    from compiler import objectives as O
    from compiler import plan as P
    from compiler.model import build
    from runtime import train as T
    plan = load([SPECS_DIR / 'paper/frozen_encoder_curriculum.gin'], SHRINK[:8]).plan
    combined, blank = plan.curriculum[3], plan.curriculum[1]
    assert T.eval_objective(plan, 'blank_copy', combined).delimiter == 3
    assert T.eval_objective(plan, 'blank_copy', blank).delimiter == 0
    # a stage without blank copy scores it as the curriculum last binds it: the combined stage's Copy Eval
    assert T.eval_objective(plan, 'blank_copy', plan.curriculum[0]).delimiter == 3
    torch.manual_seed(0)
    model = build(plan, 300).eval()
    ids = O.SpecialIds(pad=0, blank=1, copy=2)
    x = torch.randint(5, 300, (6, plan.memory.chunks, plan.memory.chunk_len))
    mask = torch.ones_like(x, dtype=torch.bool)
    out = T.evaluate(model, plan, x, mask, ids, 3, 2, None, 300, stage=combined)
    with torch.no_grad():
        logits, labels = T.forward(model, P.Objective(kind='blank_copy', delimiter=3), x, None, ids)
    keep = labels != O.IGNORE
    # chunks 2 and 3 supervised (next token inside each chunk: L - 1 targets), the 3 delimiter positions ignored
    assert keep.sum() == 6 * (2 * (plan.memory.chunk_len - 1) - 3)
    hamming = ((logits.argmax(-1) == labels) & keep).sum() / keep.sum()
    assert out['blank_copy.token_accuracy'] == pytest.approx(hamming.item(), abs=1e-6)
    undelimited = T.evaluate(model, plan, x, mask, ids, 3, 2, None, 300, stage=blank)
    assert undelimited['blank_copy.token_accuracy'] != out['blank_copy.token_accuracy']
