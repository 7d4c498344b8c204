"""python -m runtime.corpus install-docs DIR [--source FOLDER]

A larger offline corpus of real English text for the claims suite (issue 26): the embedded corpus (pydoc's topics,
~151k training tokens) is small enough that the suite's clm-only models overfit it. Debian's python3.11-doc package
ships the whole Python 3.11 documentation, and its Sphinx output keeps every page's reStructuredText source as plain
text (html/_sources/**/*.rst.txt, 497 files, ~11 MB). This command turns those sources into prose (markup, directive
lines, code and doctest blocks removed), one document per section (the embedded corpus's unit), and writes

    DIR/corpus.jsonl     one {"text": ...} per line, in a fixed order: Data.source = 'DIR/corpus.jsonl'
    DIR/MANIFEST.json    the package folder, the sha256 of every source file and of corpus.jsonl, counts

Deterministic: the same package gives the same bytes. Nothing is downloaded here; install the package with the
system's client first:

    apt-get install python3.11-doc                   # Debian 12 / Ubuntu; or, without root:
    apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pkg    # then --source pkg/usr/share/...
    python -m runtime.corpus install-docs .cache/corpus/python-docs
    python -m runtime.run specs/memory_clm.gin -b "Data.source = '.cache/corpus/python-docs/corpus.jsonl'"
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

from compiler.errors import UserError, cli
from store.files import write_text

# the packages read by default: (package, folder it installs, what is in it)
PACKAGES = (('python3.11-doc', '/usr/share/doc/python3.11/html/_sources', 'the Python 3.11 documentation, reST'),
            ('perl-doc', '/usr/share/perl/5.36.0/pod', "Perl 5.36's manual pages, POD"))
MIN_CHARS = 200  # shorter sections (a heading and a line) are left out
CODE_DIRECTIVES = ('code-block', 'sourcecode', 'code', 'testcode', 'testoutput', 'doctest', 'productionlist',
                   'literalinclude', 'highlight', 'toctree', 'raw', 'csv-table', 'image', 'figure', 'index',
                   'module', 'currentmodule', 'moduleauthor', 'sectionauthor', 'include', 'only', 'tabularcolumns')
UNDERLINE = re.compile(r'^([=\-~^"*#+`\':.])\1{2,}\s*$')
DIRECTIVE = re.compile(r'^(\s*)\.\.\s+([\w:-]+)::(.*)$')
ROLE = re.compile(r':[\w:-]+:`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`')
INLINE = [(re.compile(r'``([^`]+)``'), r'\1'), (re.compile(r'`([^`<]+?)(?:\s*<[^`>]*>)?`_{1,2}'), r'\1'),
          (re.compile(r'\*\*([^*]+)\*\*'), r'\1'), (re.compile(r'(?<![\w*])\*([^*\s][^*]*)\*'), r'\1'),
          (re.compile(r'\|([\w-]+)\|'), r'\1')]


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def inline(text: str) -> str:
    """reST inline markup to its text: roles (:func:`x`, :ref:`title <target>`), literals, links, emphasis."""
    text = ROLE.sub(r'\1', text)
    for pattern, repl in INLINE:
        text = pattern.sub(repl, text)
    return text


def _skip(lines: list[str], i: int, base: int) -> int:
    """The index after the block indented deeper than `base` that starts at line i (blank lines inside it)."""
    while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > base):
        i += 1
    return i


def prose(source: str) -> list[str]:
    """The lines of a reST page as prose: headings kept (their underlines dropped), directive lines, their options,
    comments, code, doctest and literal blocks removed, the body of prose directives (function, note, ...) kept."""
    lines, out, i = source.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        d = DIRECTIVE.match(line)
        if d:
            name, base = d.group(2), len(d.group(1))
            i += 1
            if name in CODE_DIRECTIVES or name.startswith(('c:', 'opcode', 'envvar')):
                i = _skip(lines, i, base)
            while i < len(lines) and re.match(r'^\s+:[\w-]+:', lines[i]):  # options
                i += 1
            out.append('')  # what follows is a paragraph of its own
            continue
        if re.match(r'^\s*\.\.(\s|$)', line) or line.lstrip().startswith(('>>>', '... ', '$ ')):  # comments, doctest
            i = _skip(lines, i + 1, indent(line)) if re.match(r'^\s*\.\.\s*$', line) else i + 1
            continue
        if UNDERLINE.match(line):
            i += 1
            continue
        text = inline(line.strip())
        out.append(text)
        i += 1
        if line.rstrip().endswith('::'):  # a literal block follows: code, not prose
            out[-1] = text[:-1] if not text.endswith(' ::') else text[:-3]
            j = i
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and indent(lines[j]) > indent(line):
                i = _skip(lines, j, indent(line))
                out.append('')
    return out


def sections(source: str) -> list[str]:
    """A page's prose cut into sections (a heading is a line whose next line is an underline), each a document:
    paragraphs joined into single lines, separated by blank lines."""
    raw = source.splitlines()
    heads = {i for i in range(len(raw) - 1) if raw[i].strip() and UNDERLINE.match(raw[i + 1])
             and not DIRECTIVE.match(raw[i])}
    docs, part = [], []
    for i, line in enumerate(raw):
        if i in heads and part:
            docs.append(part)
            part = []
        part.append(line)
    docs.append(part)
    out = []
    for part in docs:
        paragraphs = re.split(r'\n\s*\n', '\n'.join(prose('\n'.join(part))))
        text = '\n\n'.join(' '.join(p.split()) for p in paragraphs if p.strip())
        if len(text) >= MIN_CHARS:
            out.append(text)
    return out


POD_CODE = re.compile(r'[A-Z]<<+\s(.*?)\s>>+|[A-Z]<([^<>]*)>')


def pod_sections(source: str) -> list[str]:
    """A Perl POD page as prose, one document per =head1/=head2 section: command paragraphs dropped except headings
    and =item labels, verbatim (indented: code) paragraphs dropped, formatting codes (C<x>, L<x|y>, X<index>)
    reduced to their text."""
    docs, part, skip = [], [], False
    for para in re.split(r'\n\s*\n', source):
        if not para.strip() or para[0] in ' \t':  # blank or verbatim
            continue
        if para.startswith('='):
            cmd, _, rest = para.partition(' ')
            skip = cmd == '=begin' or (skip and cmd != '=end')
            if cmd.startswith('=head') and part:
                docs.append(part)
                part = []
            if cmd.startswith(('=head', '=item')) and rest.strip() and rest.strip() != '*':
                part.append(rest)
            continue
        if not skip:
            part.append(para)
    docs.append(part)
    out = []
    for paragraphs in docs:
        text = '\n\n'.join(' '.join(pod_text(p).split()) for p in paragraphs)
        if len(text) >= MIN_CHARS:
            out.append(text.strip())
    return out


def pod_text(text: str) -> str:
    text = re.sub(r'X<[^<>]*>', '', text)
    while True:  # innermost codes first, so nested ones (B<C<x>>) reduce too
        new = POD_CODE.sub(lambda m: _pod_code(m.group(0)[0], m.group(1) or m.group(2) or ''), text)
        if new == text:
            return new
        text = new


def _pod_code(code: str, body: str) -> str:
    if code == 'L':  # L<text|target>, L<name/"section">
        return body.split('|', 1)[0] if '|' in body else body.replace('/"', ' "')
    return {'E': {'lt': '<', 'gt': '>', 'verbar': '|', 'sol': '/'}.get(body, ''), 'Z': ''}.get(code, body)


# the package formats: file suffix -> sections of a page
FORMATS = {'.rst.txt': sections, '.pod': pod_sections}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install_docs(out: Path, sources: list[Path]) -> dict:
    """Write out/corpus.jsonl and out/MANIFEST.json from the pages (FORMATS) under each source folder, folders in
    the order given and files sorted by path; -> the manifest."""
    docs, listed = [], []
    for source in sources:
        if not source.is_dir():
            raise UserError(f'--source {source}', 'no such folder', f'install the packages first: {INSTALL}')
        files = sorted(p for p in source.rglob('*') if p.is_file() and suffix(p))
        if not files:
            raise UserError(f'--source {source}', f"holds no {' or '.join(FORMATS)} files",
                            'point it at a folder of ' + ', '.join(f'{pkg} ({f})' for pkg, f, _ in PACKAGES))
        for p in files:
            data = p.read_bytes()
            try:
                text = data.decode('utf-8')
            except UnicodeDecodeError as e:
                raise UserError(str(p), f'not UTF-8 text ({e.reason} at byte {e.start})', 'reinstall its package')
            listed.append({'source': str(source), 'path': p.relative_to(source).as_posix(), 'sha256': sha256(data)})
            docs += FORMATS[suffix(p)](text)
    body = ''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in docs)
    manifest = {'sources': [str(s) for s in sources], 'documents': len(docs),
                'characters': sum(len(d) for d in docs), 'corpus_sha256': sha256(body.encode('utf-8')),
                'files': listed}
    write_text(out / 'corpus.jsonl', body)  # never half-written, never through a planted link
    write_text(out / 'MANIFEST.json', json.dumps(manifest, indent=1) + '\n')
    return manifest


def suffix(p: Path) -> str | None:
    return next((s for s in FORMATS if p.name.endswith(s)), None)


INSTALL = ('apt-get install ' + ' '.join(pkg for pkg, _, _ in PACKAGES) + '; without root: apt-get download PKG && '
           'dpkg-deb -x PKG_*.deb pkg, then --source pkg/<its folder>')


@cli
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog='python -m runtime.corpus', description=__doc__.split('\n\n')[1])
    sub = ap.add_subparsers(dest='command', required=True)
    docs = sub.add_parser('install-docs', help='extract prose from installed documentation packages into DIR')
    docs.add_argument('dir', metavar='DIR', help='output folder (corpus.jsonl, MANIFEST.json)')
    docs.add_argument('--source', action='append', help='a folder of pages, repeatable (default: ' +
                      ', '.join(f'{f} ({what}, {pkg})' for pkg, f, what in PACKAGES) + ')')
    args = ap.parse_args(argv)
    m = install_docs(Path(args.dir), [Path(s) for s in args.source or [f for _, f, _ in PACKAGES]])
    print(f"{m['documents']} documents, {m['characters']:,} characters from {len(m['files'])} files of "
          f"{', '.join(m['sources'])}\nwrote {Path(args.dir) / 'corpus.jsonl'} (sha256 {m['corpus_sha256'][:16]}) and "
          'MANIFEST.json')


if __name__ == '__main__':
    main()
