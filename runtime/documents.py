"""Documents of a Data source, streamed one at a time, and the train/val split by content hash.

Sources (Data.source): 'embedded' (pydoc's help topics, ships with Python), a local .txt (documents separated by
blank lines, read line by line), .jsonl/.json/.parquet (through `datasets`, which memory-maps its Arrow cache), or
'hub:<name>[:<config>]' (streamed from the Hugging Face hub). Documents are stripped, empty ones dropped, and at
most Data.max_documents are taken, in source order.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from compiler.errors import UserError

OFFLINE_VARS = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE')
BLANK = re.compile(r'[ \t]*\n?')  # a separator line: only spaces and tabs (what the split on \n[ \t]*\n meant)


def where(name: str, value) -> str:
    return f'Data.{name} = {value!r}'


def local_path(source: str) -> Path:
    p = Path(source).expanduser()
    if not p.is_file():
        raise UserError(where('source', source), f'no such file: {p.resolve()}',
                        "point Data.source at an existing .txt/.jsonl/.parquet file, 'embedded', "
                        "or 'hub:<name>[:<config>]'")
    if p.suffix not in ('.txt', '.jsonl', '.json', '.parquet'):
        raise UserError(where('source', source), f'unsupported file type {p.suffix!r}',
                        'use a .txt (documents separated by blank lines), .jsonl or .parquet file')
    return p


def offline() -> str | None:
    for var in OFFLINE_VARS:
        if os.environ.get(var, '').strip().lower() in ('1', 'true', 'yes', 'on'):
            return var
    return None


def check_source(d) -> None:
    """Refuse a source that cannot be read before anything is written (hub: offline mode, no document limit)."""
    if d.source == 'embedded':
        return
    if not d.source.startswith('hub:'):
        local_path(d.source)
        return
    var = offline()
    if var:
        raise UserError(where('source', d.source), f'a hub dataset needs the network, but {var}={os.environ[var]} '
                        f'(offline mode)', f'on a machine with network unset {" and ".join(OFFLINE_VARS)}; offline, '
                        "set Data.source to 'embedded' or a local .txt/.jsonl/.parquet file")
    if d.max_documents is None:
        raise UserError(where('max_documents', None), 'a hub dataset is streamed and needs a document limit',
                        'set Data.max_documents (e.g. 100000)')


def embedded_documents() -> list[str]:
    """Real English text that ships with Python: pydoc's help topics (~465k characters), one document per section.

    Topics are reST-like text with underlined headings. Whole topics are too lumpy to split (79 documents, the
    largest 13 % of the text, so a 5 % validation draw lands anywhere between 1 % and 15 %); their 208 sections
    are coherent texts of ~1.2k characters (median) and a 5 % draw gives 5.1 % of the bytes.
    """
    from pydoc_data.topics import topics
    docs = []
    for text in topics.values():
        docs += re.split(r'\n(?=[^\n]+\n[=*\-~^"]{3,}\n)', text.strip())  # cut before each heading + underline
    return docs


def iter_documents(d) -> Iterator[str]:
    """The documents of Data `d` in source order (stripped, empty ones dropped, at most max_documents), one at a
    time. Raises UserError when the source yields none."""
    check_source(d)
    src = d.source
    if src == 'embedded':
        raw = iter(embedded_documents())
    elif src.startswith('hub:'):
        raw = _hub_documents(d)
    else:
        p = local_path(src)
        raw = _txt_documents(p, src) if p.suffix == '.txt' else _datasets_documents(d, p)
    count = 0
    for text in raw:
        text = text.strip()
        if not text:
            continue
        yield text
        count += 1
        if d.max_documents is not None and count >= d.max_documents:
            break
    if not count:
        raise UserError(where('source', src), 'the corpus is empty (no non-blank document)',
                        'point Data.source at a file with text in it')


def load_documents(d) -> list[str]:
    """Every document of Data `d` in memory (small corpora and benchmarks; preparation streams iter_documents)."""
    return list(iter_documents(d))


def _txt_documents(p: Path, src: str) -> Iterator[str]:
    """Blank-line separated documents, read line by line (universal newlines, as Path.read_text reads them)."""
    lines = []
    try:
        with open(p, encoding='utf-8') as f:
            for line in f:
                if BLANK.fullmatch(line):
                    if lines:
                        yield ''.join(lines)
                    lines = []
                else:
                    lines.append(line)
    except UnicodeDecodeError as e:
        raise UserError(where('source', src), f'not valid UTF-8 text (byte {_first_bad_byte(p)}: {e.reason})',
                        'convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`')
    if lines:
        yield ''.join(lines)


def _first_bad_byte(p: Path) -> int:
    decoder, at = codecs.getincrementaldecoder('utf-8')(), 0
    with open(p, 'rb') as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return at + e.start - len(decoder.getstate()[0])
            at += len(chunk)
    return at


def _texts(rows, d, source: str) -> Iterator[str]:
    for row in rows:
        if d.text_field not in row:
            raise UserError(where('text_field', d.text_field), f'{source} has no field {d.text_field!r} '
                            f'(fields: {", ".join(map(str, row))})',
                            'set Data.text_field to the column that holds the text')
        t = row[d.text_field]
        if t is not None and not isinstance(t, str):
            raise UserError(where('text_field', d.text_field), f'{source}: field {d.text_field!r} holds '
                            f'{type(t).__name__}, not text', 'set Data.text_field to a text column')
        if t:
            yield t


def _datasets_documents(d, p: Path) -> Iterator[str]:
    import datasets
    kind = 'parquet' if p.suffix == '.parquet' else 'json'
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split='train', cache_dir=str(Path(d.cache_dir) / 'hf'))
    except Exception as e:  # malformed file: datasets raises many different types
        raise UserError(where('source', d.source), f'could not read {p} as {kind}: {type(e).__name__}: {e}',
                        'check that the file is valid '
                        f'{"JSON lines (one object per line)" if kind == "json" else "parquet"}')
    yield from _texts(ds, d, str(p))


def _hub_documents(d) -> Iterator[str]:
    name, _, config = d.source[len('hub:'):].partition(':')
    import datasets
    try:
        ds = datasets.load_dataset(name, config or None, split=d.split, streaming=True)
        yield from _texts(ds, d, d.source)
    except UserError:
        raise
    except Exception as e:  # no network, unknown dataset/config/split: all end here
        raise UserError(where('source', d.source), f'could not stream hub dataset {name!r} (config '
                        f'{config or None!r}, split {d.split!r}): {type(e).__name__}: {e}',
                        'check the name, config and Data.split and that the hub is reachable; offline, use '
                        "'embedded' or a local file")


def draw(text: str) -> float:
    """A document's split draw in [0, 1): the first 8 bytes of sha256(content) as a number. Stable across processes
    and Python versions (unlike hash()), independent of document order and of the other documents."""
    return int.from_bytes(hashlib.sha256(text.encode('utf-8')).digest()[:8], 'big') / 2**64


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Indices of train and val documents, in source order: a document goes to val when draw() < val_fraction.
    On a tiny corpus the draw may leave a split empty; then the document with the extreme draw moves, still
    deterministically. (The token store applies the same rule while streaming: runtime/data.py.)"""
    u = [draw(t) for t in docs]
    is_val = [x < val_fraction for x in u]
    if len(docs) > 1 and val_fraction > 0 and not any(is_val):
        is_val[min(range(len(u)), key=u.__getitem__)] = True
    if len(docs) > 1 and all(is_val):
        is_val[max(range(len(u)), key=u.__getitem__)] = False
    train = [i for i, v in enumerate(is_val) if not v]
    val = [i for i, v in enumerate(is_val) if v]
    return train, val
