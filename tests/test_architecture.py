"""The layering is enforced: pyproject.toml's import-linter contracts (docs/ARCHITECTURE.md).

`lint-imports` reads the source, not the running process, so imports inside functions count as
much as those at the top of a module; imports under `if TYPE_CHECKING:` (annotations) do not.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(LINT.parent), "PYTHONPATH": str(pythonpath), "HOME": str(cwd)})


def test_the_layers_hold_with_no_cycles_and_ray_only_in_launch():
    r = lint(REPO, REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a lower layer reaching up: the config importing the CLI
    ("config/load.py", "import distft.cli", "Layers run one way"),
    # two modules of one package importing each other (config -> cli above is a cycle too)
    ("launch/errors.py", "from distft.launch import train", "No import cycles"),
    # Ray below launch
    ("stages/sft.py", "import ray", "Only launch imports Ray"),
])
def test_each_contract_catches_what_it_forbids(tmp_path, module, line, broken):
    """The same contracts on a copy of the package with one import added: that contract breaks."""
    shutil.copytree(REPO / "distft", tmp_path / "distft", ignore=shutil.ignore_patterns("__pycache__", "tiny_base"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "distft" / module
    target.write_text(target.read_text() + f"\n\ndef _added():\n    {line}\n")
    r = lint(tmp_path, tmp_path)
    assert r.returncode == 1, r.stdout[-3000:]
    assert f"{broken}" in r.stdout and any(x.startswith(broken) and x.endswith(" BROKEN") for x in r.stdout.splitlines()), \
        r.stdout[-3000:]
