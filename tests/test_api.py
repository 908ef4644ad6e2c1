"""API.md lists exactly the public API: the facade's names and the adapters' names."""

import re
from pathlib import Path

import pytest

import pyboundary

API = (Path(__file__).resolve().parents[1] / "API.md").read_text()


def _table_names(start: str, end: str) -> list:
    section = API[API.index(start):API.index(end)]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    return [name for row in rows[1:] for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", row)]


def test_api_md_lists_exactly_the_facade():
    listed = _table_names("**Facade**", "**Adapters**")
    assert len(listed) == len(set(listed)), "a name is listed twice"
    assert set(listed) == set(pyboundary.__all__), (
        f"API.md and pyboundary.__all__ differ: only in API.md {sorted(set(listed) - set(pyboundary.__all__))}, "
        f"only in __all__ {sorted(set(pyboundary.__all__) - set(listed))}")


@pytest.mark.parametrize("module", ["pyboundary.adapters.foolbox", "pyboundary.adapters.torchattacks"])
def test_api_md_lists_the_adapters(module):
    mod = pytest.importorskip(module)
    row = next(line for line in API.splitlines() if line.startswith(f"| `{module}`"))
    names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[2])
    assert sorted(names) == sorted(mod.__all__)


def test_api_md_lists_the_commands():
    from pyboundary.cli import COMMANDS

    line = next(line for line in API.splitlines() if "pyboundary.cli.COMMANDS" in line)
    block = API[API.index(line):API.index("exit code 0")]
    assert re.findall(r"`([a-z]+)`", block.replace("`pyboundary.cli.COMMANDS`", "")) == list(COMMANDS)
