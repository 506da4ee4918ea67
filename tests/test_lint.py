"""ruff check and ruff format --check over the code, as CI's gate for style."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent)) or "ruff"


def test_ruff_check():
    proc = subprocess.run(
        [RUFF, "check", "trainer", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = subprocess.run(
        [RUFF, "format", "--check", "trainer", "tests", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_benchmarks_import():
    """Benchmarks are not run in CI; at least their imports must hold."""
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.stem != "__init__":
            importlib.import_module(f"benchmarks.{path.stem}")


def test_functions_fit_on_a_screen():
    """No function in trainer/ runs past 60 lines: split it into named steps."""
    import ast

    long = []
    for path in sorted((ROOT / "trainer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines})")
    assert not long, long
