"""The README's compiler outputs are real: every `$ python -m compiler ...` in a README code block is run in process
and the lines shown under it are compared with what it prints (a `...` line stands for lines left out; a trailing
`| grep WORD` keeps the lines holding WORD). The machine's RAM, which one warning quotes, is set to the README's."""
import contextlib
import io
import re
import shlex

import pytest
from conftest import ROOT

from compiler.__main__ import main as compiler_main


def examples() -> list[tuple[int, str, list[str]]]:
    """(README line, command, the lines shown under it) of every compiler command in a README code block."""
    lines = (ROOT / 'README.md').read_text().splitlines()
    out, inside, current = [], False, None
    for i, line in enumerate(lines, 1):
        if line.startswith('```'):
            inside, current = not inside, None
            continue
        if not inside:
            continue
        if line.startswith('$ '):
            current = None
            if line.startswith('$ python -m compiler '):
                current = (i, line[2:], [])
                out.append(current)
        elif current is not None:
            current[2].append(line)
    for _, _, shown in out:  # blank lines between two commands of one block
        while shown and not shown[-1].strip():
            shown.pop()
    return out


EXAMPLES = examples()


def run(command: str, ram: float, monkeypatch) -> list[str]:
    from compiler import validate
    words = shlex.split(command, comments=True)
    grep = None
    if '|' in words:
        words, pipe = words[:words.index('|')], words[words.index('|') + 1:]
        assert pipe[0] == 'grep' and len(pipe) == 2, f'unsupported pipe in {command!r}'
        grep = pipe[1]
    assert words[:3] == ['python', '-m', 'compiler'], command
    monkeypatch.setattr(validate, 'machine_memory', lambda: ram)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            compiler_main(words[3:])
        except SystemExit:
            pass
    got = (out.getvalue() + err.getvalue()).splitlines()
    return [x for x in got if grep in x] if grep else got


def test_the_readme_shows_compiler_outputs():
    assert len(EXAMPLES) >= 12, [c for _, c, _ in EXAMPLES]
    assert any('paper' in c and '--tflops' in c for _, c, _ in EXAMPLES)


@pytest.mark.parametrize('line,command,shown', EXAMPLES, ids=[f'README.md:{n}' for n, _, _ in EXAMPLES])
def test_a_readme_compiler_output_is_what_the_compiler_prints(line, command, shown, monkeypatch):
    said = re.search(r'the ([\d.]+) GiB of RAM of this machine', '\n'.join(shown))
    ram = float(said.group(1)) * 2 ** 30 if said else 2.0 ** 50  # no RAM warning shown: plenty of RAM
    got = run(command, ram, monkeypatch)
    if '...' not in shown:
        assert got == shown, f'README.md:{line} shows\n' + '\n'.join(shown) + '\nbut it prints\n' + '\n'.join(got)
        return
    rest = iter(got)  # the shown lines appear in this order, those between `...` lines consecutively
    for part in '\n'.join(shown).split('...'):
        want = [x for x in part.strip('\n').splitlines()]
        if not want:
            continue
        for x in rest:
            if x == want[0]:
                following = [next(rest, None) for _ in want[1:]]
                assert following == want[1:], f'README.md:{line}: after {want[0]!r} the compiler prints ' \
                                              f'{following!r}, not {want[1:]!r}'
                break
        else:
            pytest.fail(f'README.md:{line}: {want[0]!r} is not in what the compiler prints:\n' + '\n'.join(got))
