"""docs/guide/reference.md names every command and every flag of `python -m adapterlib`, read off the parser itself
(`adapterlib.__main__._parser`), so a flag added to the command line without a word in the reference fails here.

Each command has its own section in the reference, a heading that names `python -m adapterlib <command>` (for
import: `python -m adapterlib import coco` and `... import odvg`), and each of its option strings (every alias
too: `--manifest`, `--steps`, `--run-name`) must appear as a word in that section. The flags of `train` and `cache`
that set a TrainConfig field (`--FIELD`, `--FIELD-NAME`) may instead be covered by the fields table, which names
each field once in backticks (tests/test_docs.py holds the table to the code)."""
import argparse
import re

import pytest

from adapterlib.__main__ import _parser
from adapterlib.paths import REPO_ROOT
from adapterlib.training.config import FIELDS

REFERENCE = REPO_ROOT / "docs" / "guide" / "reference.md"


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...],
                                                                                           argparse.ArgumentParser]]:
    """Every command that runs (a leaf of the subcommand tree), with its words: ('train',), ('import', 'coco'), ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, prefix + (name,))
    return found or [(prefix, parser)]


COMMANDS = _commands(_parser())


def _sections() -> dict[tuple[str, ...], str]:
    """Each command's section of the reference: from the heading that names `python -m adapterlib <words>` to the
    next heading of the same or a higher level."""
    lines = REFERENCE.read_text().splitlines()
    fenced, levels = False, []                           # each line's heading level (0: not a heading)
    for line in lines:
        fenced ^= line.startswith("```")
        heading = None if fenced else re.match(r"(#+) ", line)   # a `# comment` in a code block is no heading
        levels.append(len(heading.group(1)) if heading else 0)
    sections = {}
    for words, _ in COMMANDS:
        name = "python -m adapterlib " + " ".join(words)
        for i, line in enumerate(lines):
            if levels[i] and re.search(re.escape(name) + r"(?![\w-])", line):
                end = next((j for j in range(i + 1, len(lines)) if 0 < levels[j] <= levels[i]), len(lines))
                sections[words] = "\n".join(lines[i:end])
                break
    return sections


def _fields_in_table() -> set[str]:
    named = set()
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("| `"):
            named |= set(re.findall(r"`([a-z_0-9]+)`", line.strip("|").split(" | ")[0]))
    return named & set(FIELDS)


def _word(option: str, text: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


def test_the_parser_has_the_commands_the_reference_is_built_around():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"train", "evaluate", "status", "import coco", "import odvg", "cache", "export", "bench"} <= names


@pytest.mark.parametrize("words", [words for words, _ in COMMANDS], ids=lambda w: " ".join(w))
def test_every_command_has_a_section(words):
    assert words in _sections(), (f"docs/guide/reference.md has no heading naming "
                                  f"`python -m adapterlib {' '.join(words)}`")


@pytest.mark.parametrize("words, parser", COMMANDS, ids=[" ".join(words) for words, _ in COMMANDS])
def test_every_flag_is_in_its_commands_section(words, parser):
    section = _sections().get(words, "")
    table = _fields_in_table()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        field = action.dest[len("field_"):] if action.dest.startswith("field_") else None
        for option in action.option_strings:
            if (words in (("train",), ("cache",)) and field in FIELDS and field in table
                    and option in (f"--{field}", f"--{field.replace('_', '-')}")):
                continue                                 # `--FIELD`: the fields table names the field
            if not _word(option, section):
                missing.append(option)
    assert not missing, f"`python -m adapterlib {' '.join(words)}`: not in its section of docs/guide/reference.md: " \
                        f"{missing}"

