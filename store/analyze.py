"""python -m store.analyze {decode,info,retrieve,quantize,plot} RUN ... [--store runs/memories.zarr] [--stage NAME]

Offline analysis of the memory embeddings a run stored (store/memories.py) with the checkpoint that wrote them.

  decode RUN [--stage S] [-n 5]                 original vs regenerated text of the first n sequences, per-sequence
                                                token accuracy
  info RUN [RUN ...] [--csv FILE|-]             token accuracy, normalized Hamming distance, cross-entropy,
                                                I_e = 1 - CE / ln V, bits per byte of decoding from stored memories,
                                                one row per run and stage
  retrieve RUN [--stage S] [--n 7] [--mode ngram|nbag] [--seed 0] [--queries 2048]
                                                n-gram / n-bag retrieval: query = the run's encoder on n tokens of a
                                                stored chunk, candidates = every stored chunk memory, cosine;
                                                top-1 / top-5 accuracy vs chance
  quantize RUN [--stage S] [--formats F ...] [--rows N]
                                                decoding from stored memories cast to bfloat16, float8 e4m3 / e5m2
                                                and int8 (per-vector absmax) and back, against float32
  plot RUN --out DIR [--db URL]                 PNGs: memory PCA, accuracy by position in the chunk, metric curves
                                                (from --db, default the run's <out_dir>/sacred.db)

How stored memories are decoded (the run's own decoder, rebuilt from the run folder's plan and stage checkpoint; the
family registry's `readout` decides, compiler/families.py):
- autoencoder / probe: model.memory.decoder_input(memory) -> model.decoder -> head; target = every real token.
- memory family with an ae_decoder (frozen-encoder curriculum): the memories of a stage that autoencodes, the same
  through model.ae_decoder; those of later stages, which leave the ae_decoder as it was, by the blank-copy read-out
  below (through the ae_decoder every later stage would repeat the autoencode stage's numbers).
- memory family without one: blank-copy style: memory m_c in the first slot (other slots the pad slot), blank tokens
  at the chunk's real positions; position t predicts token t+1 (the blank-copy label convention), so the first
  token of a chunk has no prediction. `--readout ae_decoder|blank_copy` forces one read-out for every stage.

RUN is a run's id, its full name <id>-<key> (the name of its folder and group, store/layout.py), or its run folder's
path (then the store beside the folder is the default --store). Ids repeat across run databases: an id that matches
several groups of the store is refused with the candidates listed (give the full name, or --db to take the run key
from that database's record).

The model work (rebuilding the run's model, decoding memories, encoding queries) is the compiler's
(compiler/load.py, Graph.read_out); store/analysis/ holds the rest, one module per concern (its __init__ lists them).

Every subcommand streams the store in slices of store.memories.ROWS rows (model work in smaller micro-batches), so
memory stays bounded on stores of millions of rows. Bad input (missing store, unknown or ambiguous run, unknown stage,
half-written group, incompatible store version, damaged metadata, missing or corrupt chunks (the message names the
run, stage and rows), a checkpoint that does not match the stored widths) -> one message, exit 2.
"""
from __future__ import annotations

import argparse

import torch

from compiler import plan as P
from compiler.args import MANY, SEED, Parser, integer
from compiler.errors import UserError, cli
from store.analysis.decode import cmd_decode, cmd_info
from store.analysis.figures import cmd_plot
from store.analysis.groups import run_group
from store.analysis.quantize import FORMATS, cmd_quantize
from store.analysis.retrieve import cmd_retrieve
from store.layout import MEMORY_STORE, memory_store
from store.runref import folder_at

DEFAULT_STORE = str(memory_store(P.Run()))


def parser() -> Parser:
    ap = Parser(prog='python -m store.analyze', description=__doc__.split('\n\n')[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='command', required=True)

    def common(p, stage=True):
        p.add_argument('--store', help=f"Zarr memory store (default: the one beside a run folder given by its path, "
                       f"else {DEFAULT_STORE})")
        if stage:
            p.add_argument('--stage', help='stage name (default: every complete stage of the run)')
        p.add_argument('--db', help='run database URL: plan fallback when operative.gin is gone; plot: metric curves '
                       "(default: sqlite:///<out_dir>/sacred.db, beside the run's folder)")
        p.add_argument('--device', default='cpu', help='torch device for decoding (default cpu)')
        p.add_argument('--readout', choices=('auto', 'ae_decoder', 'blank_copy'), default='auto',
                       help='memory family: decode with the autoencoder decoder (auto when the model has one) '
                       "or by the main decoder's blank-copy read-out")
        return p

    p = common(sub.add_parser('decode', help='original vs regenerated text of stored sequences'))
    p.add_argument('run_id', metavar='RUN')
    p.add_argument('-n', type=integer(1, MANY), default=5, help='sequences to show (default 5)')
    p.set_defaults(fn=cmd_decode)

    p = common(sub.add_parser('info', help='information metrics of decoding from stored memories, one table'))
    p.add_argument('run_ids', metavar='RUN', nargs='+')
    p.add_argument('--csv', metavar='FILE',
                   help="also write the table as CSV ('-': CSV on stdout instead of the table)")
    p.add_argument('--rows', type=integer(1, MANY), help='only the first ROWS sequences of each group (default all)')
    p.set_defaults(fn=cmd_info)

    p = common(sub.add_parser('retrieve', help='n-gram / n-bag retrieval over stored memories'))
    p.add_argument('run_id', metavar='RUN')
    p.add_argument('--n', type=integer(1, MANY), default=7,
                   help="query length in tokens, at most the stored chunks' length (default 7, the paper's)")
    p.add_argument('--mode', choices=('ngram', 'nbag'), default='ngram', help='contiguous n-gram or n random tokens')
    p.add_argument('--queries', type=integer(0, MANY), default=2048,
                   help='query chunks drawn at random (default 2048; 0 = every chunk)')
    p.add_argument('--seed', type=integer(0, SEED), default=0)
    p.set_defaults(fn=cmd_retrieve)

    p = common(sub.add_parser('quantize', help='decoding from stored memories cast to lower precisions'))
    p.add_argument('run_id', metavar='RUN')
    p.add_argument('--formats', nargs='+', choices=FORMATS, default=list(FORMATS),
                   help=f"formats to cast to (default all: {', '.join(FORMATS)}; float32 is always the baseline)")
    p.add_argument('--rows', type=int, help='only the first ROWS sequences of each group (default all)')
    p.set_defaults(fn=cmd_quantize)

    p = common(sub.add_parser('plot', help='PNG figures: memory PCA, accuracy by position, metric curves'))
    p.add_argument('run_id', metavar='RUN')
    p.add_argument('--out', required=True, help='folder for the PNGs')
    p.add_argument('--points', type=integer(1, MANY), default=4000,
                   help='chunk memories sampled for the PCA scatter (default 4000)')
    p.add_argument('--rows', type=integer(1, MANY), help='sequences decoded for accuracy by position (default all)')
    p.add_argument('--seed', type=integer(0, SEED), default=0)
    p.set_defaults(fn=cmd_plot)
    return ap


def _check_args(args) -> None:
    """What argparse's types (compiler/args.py: range-checked numbers) cannot say."""
    if args.device != 'cpu':
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f'--device {args.device}', f'device not usable: {str(e).splitlines()[0]}',
                            'use --device cpu')


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    _check_args(args)
    refs = getattr(args, 'run_ids', None) or [args.run_id]
    folders = [f for f in map(folder_at, refs) if f is not None]
    beside = folders[0].out_dir / MEMORY_STORE if folders else None
    args.store = args.store or str(beside if beside is not None and beside.exists() else DEFAULT_STORE)
    if hasattr(args, 'run_ids'):  # ids -> the store's group names, before anything is read
        args.run_ids = [run_group(args.store, r, args.db) for r in args.run_ids]
    else:
        args.run_id = run_group(args.store, args.run_id, args.db)
    args.fn(args)


if __name__ == '__main__':
    main()
