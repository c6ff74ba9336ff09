"""Every ``msmlp`` command in README.md and docs/*.md runs as written, as far as it can here:
Lightning commands parse into a config (``--print_config``; ``--help`` ones show their help),
``msmlp export`` and ``msmlp benchmark`` commands parse their arguments. The runs themselves
(the embedded defaults) are the slow tests."""
import re
import shlex
from pathlib import Path

import pytest

import cli
from msmlp import benchmark, export

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def bash_blocks(text: str):
    """The contents of the ```bash fenced blocks."""
    block, inside = [], False
    for line in text.split('\n'):
        if line.startswith('```'):
            if inside:
                yield '\n'.join(block)
            inside, block = line.strip() == '```bash', []
        elif inside:
            block.append(line)


def msmlp_commands():
    for doc in DOCS:
        for block in bash_blocks(doc.read_text()):
            for line in re.sub(r'\\\n\s*', ' ', block).split('\n'):
                found = re.search(r'(?:^|[\s/])msmlp\)? (\S.*)$', line)
                if found and not line.lstrip().startswith('#'):
                    yield pytest.param(shlex.split(found.group(1), comments=True),
                                       id=f'{doc.name}: {found.group(1)[:70]}')


COMMANDS = list(msmlp_commands())


def test_the_docs_hold_commands_of_every_kind():
    kinds = {c.values[0][0] for c in COMMANDS}
    assert {'fit', 'validate', 'test', 'predict', 'export', 'benchmark'} <= kinds and len(COMMANDS) > 30


@pytest.mark.parametrize('args', COMMANDS)
def test_command_runs_as_written(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'my.yaml').write_text('trainer:\n  max_epochs: 3\n')  # the user's own config in docs/cli.md
    if args[0] == 'export':
        export.parse_args(args[1:])
    elif args[0] == 'benchmark':
        benchmark.parse_args(args[1:])
    else:
        extra = [] if {'--help', '--print_config'} & set(args) else ['--print_config']
        assert cli.main(args + extra) == 0, capsys.readouterr().err[-2000:]
        out = capsys.readouterr().out
        assert ('usage:' in out) if '--help' in args else ('trainer:' in out)
