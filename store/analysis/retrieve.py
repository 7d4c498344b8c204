"""`retrieve`: n-gram / n-bag retrieval over stored memories. A query is the run's encoder on part of a stored chunk
(compiler/queries.py, the queries the retrieval objective trains with), the candidates every stored chunk memory;
cosine similarity, streamed in blocks of queries over slices of candidates."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compiler.errors import UserError
from compiler.queries import queries
from store import memories as M
from store.analysis.decode import table
from store.analysis.groups import sample, slices, stages
from store.analysis.reload import Decoder, load_decoder


def retrieval(group: M.Group, query_fn, queries: int = 2048, seed: int = 0, desc: str = '', block: int = 4096) -> dict:
    """Rank of each query's own chunk among all stored chunk memories (cosine similarity), streamed.

    query_fn(tokens [Q, L], mask [Q, L], memories [Q, d], gen) -> query embeddings [Q, d]. Queries: `queries` chunks
    drawn at random (seeded; 0 = every chunk) among the chunks with at least one real token; candidates: every
    stored chunk with a real token. top-k = fraction of queries whose own chunk ranks < k (ties to the query's
    favour). Pass 1 embeds the queries, pass 2 streams the candidates; queries are processed in blocks."""
    gen = torch.Generator().manual_seed(seed)
    s, n, _ = group.tokens.shape
    total = s * n
    picked = sample(total, queries if queries > 0 else total, gen)
    ranks, n_cand = [], None
    for b0 in range(0, len(picked), block):
        sel = picked[b0:b0 + block]
        # pass 1: the block's queries and their targets' similarity
        qs, targets, flat_ids = [], [], []
        lo, hi = int(sel[0]) // n, int(sel[-1]) // n + 1
        for start in range(lo - lo % M.ROWS, hi, M.ROWS):
            stop = min(start + M.ROWS, s)
            here = sel[(sel >= start * n) & (sel < stop * n)]
            if not len(here):
                continue
            mem, tok, msk = group.rows(start, stop)
            local = here - start * n
            fm, ft, fk = (mem.reshape(-1, mem.shape[-1])[local], tok.reshape(-1, tok.shape[-1])[local],
                          msk.bool().reshape(-1, msk.shape[-1])[local])
            keep = fk.any(-1)
            if not keep.any():
                continue
            q = F.normalize(query_fn(ft[keep], fk[keep], fm[keep], gen).float().cpu(), dim=-1)
            c = F.normalize(fm[keep].float(), dim=-1)
            qs.append(q)
            targets.append((q * c).sum(-1))
            flat_ids.append(here[keep])
        if not qs:
            continue
        q, target, ids = torch.cat(qs), torch.cat(targets), torch.cat(flat_ids)
        greater = torch.zeros(len(q), dtype=torch.long)
        count = 0
        # pass 2: every candidate, slice by slice
        for start, _stop, mem, _, msk in slices(group, desc=f'{desc} candidates'
                                                + (f' (block {b0 // block + 1})' if len(picked) > block else '')):
            c = F.normalize(mem.reshape(-1, mem.shape[-1]).float(), dim=-1)
            valid = msk.reshape(len(c), -1).any(-1)
            sim = q @ c.T
            sim[:, ~valid] = -math.inf
            own = ids - start * n
            inside = (own >= 0) & (own < len(c))
            sim[inside.nonzero().flatten(), own[inside]] = -math.inf  # the target itself is not a competitor
            greater += (sim > target[:, None]).sum(-1)
            count += int(valid.sum())
        ranks.append(greater)
        n_cand = count
    if not ranks:
        raise UserError(f"run {group.attrs['run_id']} stage {group.attrs['stage']}", 'no stored chunk has a real token',
                        'check the store (every mask is False)')
    rank = torch.cat(ranks)
    return {'queries': len(rank), 'candidates': n_cand, 'top1': float((rank < 1).float().mean()),
            'top5': float((rank < 5).float().mean()), 'chance1': 1 / n_cand, 'chance5': min(5, n_cand) / n_cand,
            'mean_rank': float(rank.float().mean()) + 1}


def encoder_queries(dec: Decoder, n: int, mode: str):
    """query_fn of `retrieval`: the stage's encoder (compiler.load.Loaded.encode) on each chunk's query. Rows are
    drawn in groups of equal real-token counts (compiler.queries.queries takes one count); the output keeps their
    order."""
    def fn(tokens, mask, memories, gen):
        real = mask.sum(-1)
        out = torch.empty(len(tokens), dec.loaded.plan.decoder.d_model)
        for count in real.unique().tolist():
            rows = (real == count).nonzero().flatten()
            qt, qm = queries(tokens[rows], int(count), n, mode, dec.pad, gen)
            out[rows] = dec.loaded.encode(qt, qm).float()
        return out
    return fn


RETRIEVE_COLUMNS = [('run', 'run'), ('stage', 'stage'), ('step', 'step'), ('mode', 'mode'), ('n', 'n'),
                    ('queries', 'queries'), ('candidates', 'candidates'), ('top1', 'top-1'), ('chance1', 'chance@1'),
                    ('top5', 'top-5'), ('chance5', 'chance@5'), ('mean_rank', 'mean rank')]


def cmd_retrieve(args) -> None:
    rows = []
    for name, group in stages(args.store, args.run_id, args.stage):
        chunk = group.tokens.shape[-1]
        if args.n > chunk:  # queries are cut to the chunk: every query would be its whole chunk
            raise UserError(f'--n {args.n}', f'stage {name} of run {args.run_id} stores chunks of {chunk} tokens: a '
                            f'query cannot be longer than its chunk', f'pass --n 1..{chunk} (the paper: 7 of 8)')
        dec = load_decoder(group, args.db, args.device, args.readout)
        r = retrieval(group, encoder_queries(dec, args.n, args.mode), args.queries, args.seed,
                      f'retrieve {args.run_id}/{name}')
        rows.append({'run': str(args.run_id), 'stage': name, 'step': group.attrs.get('step'), 'mode': args.mode,
                     'n': args.n, **r})
    print(table(rows, RETRIEVE_COLUMNS))
    query = ('a random contiguous ' + str(args.n) + '-gram' if args.mode == 'ngram'
             else str(args.n) + ' random tokens')
    print(f'\nquery = the stage\'s encoder (model.encode) on {query} '
          f'of a stored chunk (right-padded, key-masked); candidates = every stored chunk memory; cosine similarity; '
          f'seed {args.seed}.')
