"""The reference stays true to the code: docs/guide/reference.md's fields table names every `TrainConfig` field exactly
once, with the `shapes` and `sd15` presets' values and the resume policy the code has."""
import re

import pytest

from adapterlib.training.config import FIELDS, RESUME_FIXED, RESUME_FREE, make_config
from adapterlib.paths import REPO_ROOT

REFERENCE = REPO_ROOT / "docs" / "guide" / "reference.md"


def _rows() -> list[list[str]]:
    rows = [line for line in REFERENCE.read_text().splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in rows]


def _fields_table() -> list[tuple[list[str], str, str, str]]:
    table = []
    for cells in _rows():
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        if names and all(n in FIELDS for n in names):
            table.append((names, cells[1], cells[2], cells[-1]))
    return table


def _same(text: str, value) -> bool:
    text = text.strip().strip("`")
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return text == str(value)


def test_the_fields_table_names_every_field_once():
    named = [n for names, *_ in _fields_table() for n in names]
    assert sorted(named) == sorted(FIELDS), (f"missing from docs/guide/reference.md: {sorted(set(FIELDS) - set(named))}; "
                                             f"named twice: {sorted({n for n in named if named.count(n) > 1})}")


def test_the_fields_table_says_what_resume_may_change():
    for names, _, _, policy in _fields_table():
        for name in names:
            assert policy == ("free" if name in RESUME_FREE else "fixed"), f"{name}: the table says {policy!r}"
            assert name in RESUME_FREE or name in RESUME_FIXED


@pytest.mark.parametrize("column, preset", [(1, "shapes"), (2, "sd15")])
def test_the_fields_table_gives_the_presets_values(column, preset):
    cfg = make_config(preset, run_name="x", **({} if preset == "shapes" else {"base_model": "models/sd15"}))
    checked = 0
    for names, shapes, sd15, _ in _fields_table():
        cell = (shapes, sd15)[column - 1]
        if cell == "same":
            cell = shapes
        if cell.startswith("(") or "<" in cell or names == ["preset"]:
            continue                                     # "(give a path)", the default run name
        values = [v.strip() for v in cell.split(",")]
        assert len(values) == len(names), f"{names}: {cell!r} gives {len(values)} values"
        for name, text in zip(names, values):
            assert _same(text, getattr(cfg, name)), f"{preset} {name}: the table says {text!r}, the preset " \
                                                     f"{getattr(cfg, name)!r}"
            checked += 1
    assert checked > 30
