"""python -m store.export RUN OUT [--db URL] [--stage NAME]: a recorded run as a self-contained folder.

    OUT/config.json        the plan (compiler.plan.Plan.to_dict), vocabulary size, special token ids, the weights
                           file and its sha256, the run it came from and its provenance
    OUT/model.safetensors  the weights: final, or the end of --stage (checked against the sha256 the run recorded)
    OUT/tokenizer.json     the run's tokenizer
    OUT/operative.gin      the complete spec the run was compiled from (python -m compiler OUT/operative.gin)
    OUT/README.md          a model card: what the model is, its plan, the run's stage-end metrics, provenance, how
                           to load it
    OUT/source.diff        only with --include-diff: the uncommitted changes of the source tree the run ran (an
                           export is meant to be shared, and a diff may hold anything; config.json records the
                           diff's sha256 and size either way, the diff itself stays in the run folder)
    OUT/hf/                the decoder as a Hugging Face Llama checkpoint (families whose decoder is a causal
                           transformer over tokens): transformers.LlamaForCausalLM.from_pretrained(OUT/hf) computes
                           the logits our decoder computes on a plain token sequence (no memories); with
                           tokenizer.json and tokenizer_config.json for PreTrainedTokenizerFast

`compiler.load.from_pretrained(OUT)` loads the model without the database, the run folder or the data cache.
RUN is a run id, its full name <id>-<key>, or its run folder's path (store/runref.py), looked up in the run
database (--db; default: the sacred.db beside a run folder given by its path, else sqlite:///runs/sacred.db).
OUT must not exist (or be an empty folder); the folder is written beside it and renamed into place, so OUT is whole
or absent. Bad input (unknown run, weights missing or changed since the run recorded them, an OUT that holds files)
is one message, exit 2; so is a full or read-only disk (nothing is left half-written). Files get the permissions the
umask gives.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from compiler import load
from compiler.args import Parser
from compiler.digest import sha256_file
from compiler.errors import UserError, cli
from compiler.families import family
from compiler.llama import llama_config, stack_to_llama
from compiler.plan import Backbone, Plan
from store.database import DEFAULT_DB, RunRecord, display_url, open_db
from store.files import disk_error, settle
from store.layout import RunFolder
from store.runref import database_for, record_of
from store.runs import code_line, stage_end_metrics
from store.tables import metrics_table, plan_summary, spec_text

EXPORT_VERSION = 1


def weights_of(db, run: RunRecord, stage: str | None) -> tuple[Path | None, bytes | None, str | None]:
    """(the weights file, or their bytes from a BLOB artifact when the file is gone; the sha256 the run recorded)."""
    refs = run.info.get('weights') or {}
    ref = (refs.get('stages') or {}).get(stage) if stage else refs.get('final')
    run_dir = run.info.get('run_dir')
    path = Path(ref['path']) if ref else (RunFolder.at(run_dir).weights(stage) if run_dir else None)
    sha = ref.get('sha256') if ref else None
    if path is not None and path.is_file():
        return path, None, sha
    blob = db.artifact(run.id, 'final.safetensors') if stage is None else None  # runs recorded with BLOBs
    return path, blob, sha


def hf_export(model, plan: Plan, vocab: int, special_ids: dict, out: Path, tokenizer: Path) -> str | None:
    """The decoder as a Llama checkpoint in out/hf; None when written, else why not."""
    fam = family(plan)
    if isinstance(plan.decoder, Backbone):
        return (f'the decoder is the pretrained {plan.decoder.source}'
                + (' with a LoRA adapter (peft/decoder)' if plan.decoder.lora else ''))
    if not fam.token_decoder:
        return f"the '{plan.family}' decoder reads memories, not tokens"
    if plan.decoder.kind != 'transformer' or not plan.decoder.causal:
        return 'the decoder is not a causal transformer (a masked mixer has no Llama equivalent)'
    from safetensors.torch import save_file
    hf = out / 'hf'
    hf.mkdir()
    length = model.decoder.seq_len if hasattr(model.decoder, 'seq_len') else plan.memory.chunks * plan.memory.chunk_len
    config = llama_config(plan.decoder, vocab, length, special_ids)
    (hf / 'config.json').write_text(json.dumps(config, indent=1) + '\n')
    save_file(stack_to_llama({k: v.contiguous() for k, v in model.decoder.state_dict().items()}),
              str(hf / 'model.safetensors'), metadata={'format': 'pt'})
    shutil.copyfile(tokenizer, hf / 'tokenizer.json')
    (hf / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'PreTrainedTokenizerFast', 'pad_token': '<pad>', 'eos_token': '<eod>',
        'model_max_length': config['max_position_embeddings']}, indent=1) + '\n')
    return None


def peft_export(model, plan: Plan, run: RunRecord, out: Path) -> dict:
    """Every backbone's LoRA adapter as peft loads it onto its base (OUT/peft/<role>); -> {role: the base's source,
    revision and weight sha256 as the run recorded them, and the adapter folder}."""
    from compiler.backbone import save_adapter
    from compiler.tokens import backbones
    out_map = {}
    for role, b in backbones(plan):
        if b.share_encoder:
            continue
        entry = dict((run.info.get('backbones') or {}).get(role) or {'source': b.source, 'revision': b.revision})
        if b.lora is not None:
            save_adapter(getattr(model, role), out / 'peft' / role)
            entry['adapter'] = f'peft/{role}'
        out_map[role] = entry
    return out_map


def card(run: RunRecord, plan: Plan, cfg: dict, sm: dict, hf_note: str | None) -> str:
    """The model card (OUT/README.md)."""
    fam = family(plan)
    stage = cfg['weights']['stage']
    lines = [f"# memspec run {run.id}: {spec_text(run)}", '',
             f"A `{plan.family}` model ({fam.summary}), trained by memspec's `python -m runtime.run` and exported "
             f"with `python -m store.export`.", '',
             f"- run: {run.name} of {cfg['run']['database']}, experiment `{run.experiment}`, status {run.status}",
             f"- plan hash: {cfg['spec_hash']}, seed {plan.run.seed}",
             f"- code: {code_line((cfg.get('provenance') or {}).get('code') or {})}",
             f"- weights: `model.safetensors` ({'final' if stage is None else f'end of stage {stage}'}), sha256 "
             f"`{cfg['weights']['sha256']}`",
             f"- vocabulary: {cfg['vocab_size']} tokens (`tokenizer.json`), special ids "
             + ', '.join(f'{k} {v}' for k, v in cfg['special_ids'].items()), '', '## Plan', '']
    lines += [f'- {k}: {v}' for k, v in plan_summary(plan.to_dict())]
    lines += [f"- curriculum: {', '.join(f'{s.name} ({s.steps} steps)' for s in plan.curriculum)}",
              '', '## Stage-end metrics', '',
              'Held-out metrics at the last step of each stage (as `python -m store.runs show` prints them):', '']
    lines += ['```', metrics_table(sm, run.end_steps, indent='') if sm else 'none recorded', '```', '']
    lines += ['## Load', '', '```python', 'from compiler.load import from_pretrained',
              "model = from_pretrained('.')  # this folder; memspec's compiler is the only requirement", '```', '']
    if hf_note is None:
        lines += ['The decoder alone is also a Hugging Face Llama checkpoint (its logits on a plain token sequence, '
                  'without memories, are the decoder\'s):', '', '```python', 'import transformers',
                  "lm = transformers.LlamaForCausalLM.from_pretrained('hf')",
                  "tok = transformers.PreTrainedTokenizerFast.from_pretrained('hf')", '```', '']
    else:
        lines += [f'No Hugging Face export: {hf_note}.', '']
    lines += ['`operative.gin` is the complete spec the run was compiled from.', '']
    return '\n'.join(lines)


def _plan(run: RunRecord, stage: str | None, where: str) -> Plan:
    if 'plan' not in run.config:
        raise UserError(where, 'the run recorded no plan', 'export a run recorded by python -m runtime.run')
    plan = load.plan_from_dict(run.config['plan'], where, 'export a run recorded by python -m runtime.run')
    if stage is not None and stage not in plan.stage_names:
        raise UserError(f'--stage {stage}', f"run {run.id} has no stage '{stage}' (stages: "
                        f"{', '.join(plan.stage_names)})", 'pick a listed stage, or leave --stage out for the final '
                        'weights')
    return plan


def _weights(db, run: RunRecord, stage: str | None, where: str) -> tuple[Path, bytes | None]:
    """The weights file (or its bytes from a BLOB), checked against the sha256 the run recorded."""
    path, blob, sha = weights_of(db, run, stage)
    if path is None or (blob is None and not path.is_file()):
        raise UserError(where, f"the run's weights are not on this machine ({path or 'no path recorded'})",
                        'export on the machine that holds the run folder, or copy the folder to the recorded path')
    if blob is None and sha is not None and sha256_file(path) != sha:
        raise UserError(where, f'{path} changed since the run recorded it (its sha256 differs)',
                        'restore the run folder from a backup; the recorded sha256 is in python -m store.runs show')
    return path, blob


def _tokenizer(run: RunRecord, path: Path, where: str) -> Path:
    """The run folder's tokenizer.json, else the data cache's."""
    run_dir = Path(run.info.get('run_dir') or path.parent)
    tokenizer = RunFolder.at(run_dir).tokenizer
    if not tokenizer.is_file():
        tokenizer = Path((run.info.get('data') or {}).get('cache') or '/nonexistent') / 'tokenizer.json'
    if not tokenizer.is_file():
        raise UserError(where, f'no tokenizer: neither {RunFolder.at(run_dir).tokenizer} nor the data cache',
                        'keep the run folder (it holds tokenizer.json) or its data cache where the run wrote them')
    return tokenizer


def shared_provenance(run: RunRecord, include_diff: bool) -> tuple[dict, str | None]:
    """(the provenance config.json carries, the diff to write as OUT/source.diff or None): the diff's sha256 and
    size always, its text only when asked (from the run folder's source.diff, else the recorded copy)."""
    prov = dict(run.config.get('provenance') or {})
    code = dict(prov.get('code') or {})
    recorded = code.pop('diff', None)
    prov['code'] = code
    if not include_diff or not code.get('diff_bytes'):
        return prov, None
    kept = RunFolder.at(run.info['run_dir']).source_diff if run.info.get('run_dir') else None
    diff = kept.read_text() if kept is not None and kept.is_file() else recorded
    if diff is None:
        raise UserError(f'export {run.id}', "--include-diff: the run's diff is neither in its folder (source.diff) "
                        'nor recorded', 'export without --include-diff (config.json still records its sha256)')
    return prov, diff


def export(db, run: RunRecord, out: Path, stage: str | None = None, include_diff: bool = False) -> Path:
    where = f'export {run.id}'
    plan = _plan(run, stage, where)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f'OUT {out}', 'already exists and is not an empty folder',
                        'export into a new folder (nothing of an existing one is replaced)')
    path, blob = _weights(db, run, stage, where)
    tokenizer = _tokenizer(run, path, where)
    provenance, diff = shared_provenance(run, include_diff)
    tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if blob is None:
            shutil.copyfile(path, tmp / 'model.safetensors')
        else:
            (tmp / 'model.safetensors').write_bytes(blob)
        _write(db, run, plan, stage, tmp, tokenizer, where, provenance, diff)
        settle(tmp)  # safetensors writes 0600: every file gets the umask's mode, as the README promises
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except Exception as e:
        err = disk_error(e, f'OUT {out}', out, 'nothing was exported')
        if err is None:
            raise
        raise err from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write(db, run: RunRecord, plan: Plan, stage: str | None, tmp: Path, tokenizer: Path, where: str,
           provenance: dict, diff: str | None) -> None:
    """Everything beside model.safetensors, once the weights load into the plan's graph (compiler.load)."""
    data = run.info.get('data') or {}
    weights, fix = tmp / 'model.safetensors', 'rerun the run (or the stage) to rewrite its weights'
    vocab = data.get('vocab_size') or load.header_shapes(weights, where, fix)['decoder.head.weight'][0]
    model = load.load(plan, weights, where=where, fix=fix, vocab_size=vocab).model  # checked against the plan
    shutil.copyfile(tokenizer, tmp / 'tokenizer.json')
    (tmp / 'operative.gin').write_text(run.config.get('operative_gin') or '')
    cfg = {'format': load.EXPORT_FORMAT, 'version': EXPORT_VERSION, 'family': plan.family,
           'spec_hash': run.config.get('spec_hash'), 'plan': plan.to_dict(), 'vocab_size': vocab,
           'special_ids': data.get('special_ids') or {},
           'weights': {'file': 'model.safetensors', 'sha256': sha256_file(weights), 'stage': stage},
           'run': {'id': run.id, 'key': run.run_key, 'name': run.name, 'experiment': run.experiment,
                   'database': display_url(db.url), 'spec': run.config.get('spec_sources') or run.spec_files},
           'provenance': provenance, 'source_diff': 'source.diff' if diff is not None else None}
    (tmp / 'config.json').write_text(json.dumps(cfg, indent=1) + '\n')
    hf_note = hf_export(model, plan, vocab, cfg['special_ids'], tmp, tokenizer)
    cfg['backbones'] = peft_export(model, plan, run, tmp)
    (tmp / 'config.json').write_text(json.dumps(cfg, indent=1) + '\n')
    (tmp / 'README.md').write_text(card(run, plan, cfg, stage_end_metrics(db, run), hf_note))
    if diff is not None:
        (tmp / 'source.diff').write_text(diff)


@cli
def main(argv=None) -> None:
    ap = Parser(prog='python -m store.export', description=__doc__.split('\n\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split('\n\n', 1)[1])
    ap.add_argument('run', metavar='RUN', help="run id (python -m store.runs list), its full name <id>-<key>, or "
                    "its run folder's path")
    ap.add_argument('out', metavar='OUT', help='the folder to write (must not exist, or be empty)')
    ap.add_argument('--db', metavar='URL', help=f'run database (default: the one beside a run folder given by its '
                    f'path, else {DEFAULT_DB})')
    ap.add_argument('--stage', help='export the weights at the end of this stage (default: the final weights)')
    ap.add_argument('--include-diff', action='store_true',
                    help="also write the run's uncommitted source changes (OUT/source.diff); by default config.json "
                         'records only their sha256 and size')
    args = ap.parse_args(argv)
    db = open_db(database_for(args.run, args.db, DEFAULT_DB))
    run = record_of(db, args.run)
    out = export(db, run, Path(args.out), args.stage, args.include_diff)
    files = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
    print(f"exported run {run.name} to {out}: {', '.join(files)}")
    print(f"load it with compiler.load.from_pretrained({str(out)!r})", file=sys.stderr)


if __name__ == '__main__':
    main()
