"""The larger corpus's extractor (python -m runtime.corpus install-docs), on tiny pages of the two formats the
packages ship (reST sources of Sphinx, Perl POD): prose in, markup and code out, one document per section, the same
bytes every time, a manifest of sha256s, read back through the normal local-file path (Data.source), and one clear
refusal where a folder is missing. The real packages are not needed."""
import hashlib
import json

import pytest

from compiler import plan as P
from runtime import corpus as C
from runtime.documents import load_documents

RST = """:mod:`bisect` --- Array bisection algorithm
===========================================

.. module:: bisect
   :synopsis: Array bisection algorithms for binary searching.

This module provides support for maintaining a list in sorted order without
having to sort the list after each insertion, see :func:`insort` and ``bisect()``.
The following example shows it::

    >>> import bisect
    >>> bisect.bisect([1, 2], 1)

After the example the prose goes on for a while so that the section is long enough to be kept as a document.

.. function:: bisect_left(a, x, lo=0)

   Locate the insertion point for *x* in *a* to maintain sorted order, as the
   :ref:`sorting how-to <sortinghowto>` explains at length for the interested reader.

Searching sorted lists
----------------------

.. code-block:: python

   def index(a, x):
       return bisect_left(a, x)

The above functions are useful for finding insertion points but can be tricky or awkward to use for common
searching tasks, which the **following** functions show, each with its own short description and an example.
"""

POD = """=head1 NAME
X<syntax>

perlsyn - Perl syntax, a long enough name line to carry this section over the minimum length of a kept document
when it is joined with the description below, which it is not: every section is a document of its own, and
a short one is left out.

=head1 DESCRIPTION

A Perl program consists of a sequence of declarations and statements
which run from the top to the bottom. Perl is a B<free-form> language, see
L<perltrap> and L<the manual|perlfunc/"open"> for C<undef> and E<lt>STDINE<gt> and B<C<nested>> codes.

    my $x = 1;   # verbatim: code

=begin html

<p>not prose</p>

=end html

=over

=item The first item label

Items are prose too, and this one is long enough to matter for the count of characters in the section.

=back
"""


def fixture(tmp_path):
    rst, pod = tmp_path / 'python' / 'library', tmp_path / 'pod'
    rst.mkdir(parents=True)
    pod.mkdir()
    (rst / 'bisect.rst.txt').write_text(RST)
    (rst / 'ignored.html').write_text('<p>not a page of the formats</p>')
    (pod / 'perlsyn.pod').write_text(POD)
    return [tmp_path / 'python', pod]


def test_rest_pages_become_prose_one_document_per_section():
    docs = C.sections(RST)
    assert len(docs) == 2 and docs[1].startswith('Searching sorted lists\n\nThe above functions')
    first = docs[0]
    assert first.startswith('bisect --- Array bisection algorithm\n\nThis module provides support')
    assert 'see insort and bisect().' in first and 'The following example shows it:' in first
    assert 'as the sorting how-to explains' in first and 'Locate the insertion point for x in a' in first
    for markup in ('>>>', '.. ', ':synopsis:', 'def index', ':func:', '``', '====', 'bisect_left(a, x, lo=0)'):
        assert markup not in '\n'.join(docs), markup
    assert '**' not in docs[1] and 'which the following functions show, each' in docs[1]


def test_pod_pages_become_prose_one_document_per_heading():
    docs = C.pod_sections(POD)
    assert len(docs) == 2 and docs[0].startswith('NAME\n\nperlsyn - Perl syntax')
    body = docs[1]
    assert 'Perl is a free-form language, see perltrap and the manual for undef and <STDIN> and nested codes.' in body
    assert 'The first item label\n\nItems are prose too' in body
    for markup in ('my $x', '<p>', 'X<', 'B<', '=item', '=over'):
        assert markup not in body, markup


def test_install_docs_is_deterministic_with_a_manifest_and_loads_as_a_local_file(tmp_path, capsys):
    sources = fixture(tmp_path / 'pkg')
    out = tmp_path / 'corpus'
    C.main(['install-docs', str(out)] + [a for s in sources for a in ('--source', str(s))])
    assert '4 documents' in capsys.readouterr().out
    body = (out / 'corpus.jsonl').read_bytes()
    manifest = json.loads((out / 'MANIFEST.json').read_text())
    assert manifest['corpus_sha256'] == hashlib.sha256(body).hexdigest() and manifest['documents'] == 4
    assert [(f['path'], f['sha256']) for f in manifest['files']] == [
        ('library/bisect.rst.txt', hashlib.sha256(RST.encode()).hexdigest()),
        ('perlsyn.pod', hashlib.sha256(POD.encode()).hexdigest())]
    C.install_docs(tmp_path / 'again', sources)
    assert (tmp_path / 'again' / 'corpus.jsonl').read_bytes() == body  # the same pages give the same bytes
    docs = load_documents(P.Data(source=str(out / 'corpus.jsonl')))
    assert docs == C.sections(RST) + C.pod_sections(POD)


def test_a_missing_package_folder_is_one_clear_refusal(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        C.main(['install-docs', str(tmp_path / 'out'), '--source', str(tmp_path / 'nope')])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'no such folder' in err and 'apt-get install python3.11-doc perl-doc' in err
    assert 'Traceback' not in err and not (tmp_path / 'out').exists()
