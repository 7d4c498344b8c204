"""python -m compiler SPEC [more.gin ...] [-b BINDING ...] [--json]: check a spec and print the compiled plan.

`python -m compiler --fields` prints the field reference of every configurable (docs/fields.md).
"""
from __future__ import annotations

import argparse
import json
import sys

from compiler import cost
from compiler.args import Parser, integer, real
from compiler.errors import UserError, cli
from compiler.pretrained import report as backbone_report
from compiler.spec import load


def report(spec) -> dict:
    plan = spec.plan
    p = cost.params(plan)
    stages = cost.stage_costs(plan)
    return {
        'spec_hash': spec.hash,
        'files': spec.files,
        'bindings': spec.bindings,
        'family': plan.family,
        'components': p,
        'parameters': sum(p.values()),
        'flops_per_token': {'inference': cost.flops_per_token(plan),
                            **{f'train:{s.name}': s.train_flops_per_token for s in stages}},
        'kv_cache_bytes_per_sequence': cost.kv_cache_bytes(plan),
        'training_flops': cost.training_flops(plan),
        'activation_bytes_per_batch': {s.name: s.activation_bytes for s in stages},
        'steps_scale': plan.run.steps_scale,
        'curriculum': [{'stage': st.name, 'steps': st.steps, 'unscaled_steps': unscaled,
                        # as the plan holds them: two clm objectives stay two (a dict keyed by kind merged them)
                        'objectives': [[o.kind, o.weight] for o in st.objectives], 'normalize': st.normalize,
                        'lr': st.lr, 'warmup': st.warmup, 'decay': st.decay,
                        'freeze': list(cost.effective_freeze(plan, st.freeze)),
                        'init_from': dict(st.init_from), 'trainable': c.trainable, 'frozen': c.frozen,
                        **({'batch_size': st.batch_size} if st.batch_size else {})}  # a stage's own batch only
                       for st, c, unscaled in zip(plan.curriculum, stages, spec.unscaled_steps)],
        'warnings': [{'where': w.where, 'what': w.what, 'fix': w.fix} for w in spec.warnings],
        'plan': plan.to_dict(),
        **backbone_report(plan),  # only plans with backbones have these keys
    }


def _si(x: float) -> str:
    for unit, scale in (('E', 1e18), ('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(x) >= scale:
            return f'{x / scale:.2f}{unit}'
    return f'{x:.0f}'


def _curriculum_lines(r: dict) -> list[str]:
    """The curriculum table of the report: a row per stage, then its own batch and init_from sources."""
    lines = [f"  {'stage':<14}{'steps':>7}  {'objectives':<28}{'lr':>8}{'warmup':>7}  {'trainable':>9}{'frozen':>9}"
             f"{'train FLOPs/tok':>16}{'act. mem/batch':>15}  frozen components"]
    for c in r['curriculum']:
        obj = ' + '.join(f'{w:g}*{k}' for k, w in c['objectives'])
        if c['normalize'] == 'faithful':
            obj += ' (faithful)'
        lines.append(f"  {c['stage']:<14}{c['steps']:>7}  {obj:<28}{c['lr']:>8.0e}{c['warmup']:>7}  "
                     f"{_si(c['trainable']):>9}{_si(c['frozen']):>9}"
                     f"{_si(r['flops_per_token']['train:' + c['stage']]):>16}"
                     f"{_si(r['activation_bytes_per_batch'][c['stage']]) + 'B':>15}  {', '.join(c['freeze']) or '-'}")
        if 'batch_size' in c:
            lines.append(f"  {'':<14}{'':>7}  batch {c['batch_size']} rows (Stage.batch_size)")
        for comp, src in c['init_from'].items():
            lines.append(f"  {'':<14}{'':>7}  init {comp} <- {src}")
    return lines


def render(r: dict) -> str:
    plan = r['plan']
    m = plan['memory']
    vocab = r['tokens']['vocab'] if 'tokens' in r else plan['data']['vocab_size']
    lines = [f"plan {r['spec_hash']}  family={r['family']}  chunks={m['chunks']} x {m['chunk_len']} tokens  "
             f"vocab={vocab}  batch={plan['data']['batch_size']}", '']
    tree: dict[str, list] = {}
    for name, n in r['components'].items():
        top, sub = name.split('.', 1)
        tree.setdefault(top, []).append((sub, n))
    for top in ('encoder', 'memory', 'decoder', 'ae_decoder'):
        if top not in tree:
            continue
        stack = plan[top] or plan['decoder']
        bb = r.get('backbones', {}).get(top if plan[top] else 'decoder')
        desc = (f"position={m['position']} slots={m['slots']} pad={m['pad']} compression={m['compression']}"
                if top == 'memory' else _backbone_line(bb) if bb
                else f"{stack['kind']} d{stack['d_model']} x{stack['n_layers']} "
                     f"{'causal' if stack['causal'] else 'bidirectional'}")
        lines.append(f"{top:<10} {_si(sum(n for _, n in tree[top])):>9}   {desc}")
        for i, (sub, n) in enumerate(tree[top]):
            lines.append(f"  {'└─' if i == len(tree[top]) - 1 else '├─'} {sub:<12} {_si(n):>9}")
    lines += [f"{role:<10} {'0':>9}   {_backbone_line(bb)}"  # no parameters of its own: it runs the encoder's
              for role, bb in r.get('backbones', {}).items() if bb['share_encoder']]
    lines += [f"{'total':<10} {_si(r['parameters']):>9}", '',
              f"FLOPs/token inference      {_si(r['flops_per_token']['inference'])}",
              f"KV cache / sequence        {_si(r['kv_cache_bytes_per_sequence'])}B",
              f"training FLOPs (all stages) {_si(r['training_flops'])}"
              + (f"   ~ {r['estimate']['hours']:.1f} h on {r['estimate']['devices']} device(s) at "
                 f"{r['estimate']['tflops']:g} TFLOP/s sustained each" if 'estimate' in r else ''), '',
              'curriculum']
    lines += _curriculum_lines(r)
    if r['steps_scale'] != 1:
        scaled = ', '.join(f"{c['stage']} {c['unscaled_steps']} -> {c['steps']}" for c in r['curriculum'])
        lines.append(f"  steps x {r['steps_scale']:g} (Run.steps_scale; warmup scaled too, eval_every capped at the "
                     f'steps): {scaled}')
    lines += _token_lines(r.get('tokens'))
    for w in r['warnings']:
        lines += ['', f"warning: {w['where']}: {w['what']}", f"  fix: {w['fix']}"]
    return '\n'.join(lines)


def _token_lines(t: dict | None) -> list[str]:
    """Where memspec's special tokens are in a backbone's vocabulary (plans with backbones only)."""
    if not t:
        return []
    return ['', f"tokens     vocab {t['vocab']} = {t['embedding_rows']} embedding rows + {len(t['new_rows'])} new "
            f"({', '.join(t['new_rows']) or 'none'}); tokenizer {t['tokenizer_size']}"] + \
        [f"  {name:<8} {s['id']:>7}  {s['from']}" for name, s in t['special'].items()]


def _backbone_line(b: dict) -> str:
    lora = b['lora']
    return (f"{b['model_type']} {b['source']} d{b['d_model']} x{b['n_layers']} "
            f"{'causal' if b['causal'] else 'bidirectional'} {b['dtype']}"
            + (', the encoder\'s modules with the adapter off' if b['share_encoder'] else '')
            + (f" lora r{lora['r']}" if lora else '') + (' base trains' if b['train_base'] else ''))


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    ap = Parser(prog=prog, description=description)
    ap.add_argument('specs', nargs='+', help='gin spec files; later files override earlier ones')
    ap.add_argument('-b', '--binding', action='append', default=[],
                    help="extra gin binding, e.g. -b 'Memory.chunks = 8'")
    return ap


@cli
def main(argv=None):
    if (sys.argv[1:] if argv is None else argv) == ['--fields']:  # the field reference needs no spec
        from compiler.fields import markdown
        print(markdown(), end='')
        return
    ap = parser('python -m compiler', __doc__)
    ap.add_argument('--fields', action='store_true',
                    help='print the field reference of every configurable (docs/fields.md) and exit; alone')
    ap.add_argument('--json', action='store_true', help='print the report as JSON')
    ap.add_argument('--devices', type=integer(1, 2 ** 20), default=1,
                    help='devices for the runtime estimate (torchrun --nproc_per_node)')
    ap.add_argument('--tflops', type=real(0, 1e9, above=True),
                    help='sustained TFLOP/s per device for a runtime estimate '
                    '(e.g. 300 for an H100 in bf16 at ~30%% of peak); omitted: no estimate')
    args = ap.parse_args(argv)
    if args.fields:
        raise UserError('--fields', 'the field reference takes no spec', 'run python -m compiler --fields alone')
    spec = load(args.specs, args.binding, devices=args.devices)
    r = report(spec)
    if args.tflops:
        r['estimate'] = {'devices': args.devices, 'tflops': args.tflops,
                         'hours': r['training_flops'] / (args.devices * args.tflops * 1e12) / 3600}
    print(json.dumps(r, indent=2) if args.json else render(r))


if __name__ == '__main__':
    main()
