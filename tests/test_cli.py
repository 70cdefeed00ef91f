"""The real ``gpt-tui`` command in a subprocess: train headless, then generate."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from engine.events import read_metrics
from tests.conftest import REPO, run_cli

TINY = ["--preset", "tiny", "--tokenizer", "char", "--context", "32", "--n-layer", "1", "--n-embd", "32",
        "--n-head", "2", "--batch-size", "4", "--eval-batches", "2", "--device", "cpu", "--dtype", "fp32"]


def test_train_headless_then_generate(corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    r = run_cli("train", "--headless", "--data", str(corpus), *TINY, "--max-steps", "30", "--eval-every", "10",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "step" in r.stdout and "finished" in r.stdout and "Traceback" not in r.stderr
    for name in ("config.json", "metrics.jsonl"):
        assert (out / name).exists()
    types = {rec["type"] for rec in read_metrics(str(out / "metrics.jsonl"))}
    assert {"start", "step", "eval", "sample", "checkpoint", "state"} <= types
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["context"] == 32

    g1 = run_cli("generate", str(out), "--prompt", "It had", "-n", "40", "--seed", "7")
    g2 = run_cli("generate", str(out), "--prompt", "It had", "-n", "40", "--seed", "7")
    assert g1.returncode == 0, g1.stderr
    assert g1.stdout == g2.stdout and len(g1.stdout.strip()) > 0  # same seed, same text; only text on stdout
    greedy = run_cli("generate", str(out), "--prompt", "It had", "-n", "20", "--temperature", "0")
    greedy2 = run_cli("generate", str(out), "--prompt", "It had", "-n", "20", "--temperature", "0", "--seed", "99")
    assert greedy.stdout == greedy2.stdout
    assert greedy.stdout.startswith("It had")  # the prompt, then its continuation (as the book prints)
    bare = run_cli("generate", str(out), "--prompt", "It had", "-n", "20", "--temperature", "0", "--no-echo")
    assert bare.returncode == 0, bare.stderr
    assert "It had" + bare.stdout == greedy.stdout


def test_no_terminal_runs_headless_with_a_note(corpus: Path, tmp_path: Path):
    r = run_cli("train", "--data", str(corpus), *TINY, "--max-steps", "3", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "no terminal to draw on; running headless" in r.stderr
    assert "finished" in r.stdout


def test_config_file_and_flags_override(corpus: Path, tmp_path: Path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{corpus}"\nmax-steps = 50\nbatch_size = 2\n')
    r = run_cli("train", "--headless", "--config", str(toml), *TINY, "--max-steps", "4", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert cfg["max_steps"] == 4 and cfg["batch_size"] == 4  # flags win over the file


def test_help_lists_the_flags():
    r = run_cli("train", "--help")
    assert r.returncode == 0
    for flag in ("--data", "--preset", "--tokenizer", "--context", "--stride", "--batch-size", "--grad-accum",
                 "--epochs", "--max-steps", "--lr", "--initial-lr", "--min-lr", "--warmup-steps",
                 "--weight-decay", "--grad-clip", "--eval-every", "--eval-batches", "--sample-every", "--prompt",
                 "--checkpoint-every", "--device", "--dtype", "--compile", "--seed", "--out", "--resume",
                 "--headless", "--config"):
        assert flag in r.stdout, flag


def test_engine_never_imports_the_ui():
    """engine/ is a plain library: no textual, rich, plotext or tui imports anywhere in it."""
    banned = {"textual", "rich", "plotext", "textual_plotext", "tui", "typer"}
    offenders = []
    for path in (REPO / "engine").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in banned]
    assert offenders == []


def test_engine_imports_without_ui_packages_loaded():
    import subprocess
    import sys

    code = ("import sys, engine.trainer, engine.inference, engine.sampling, engine.checkpoint;"
            "bad=[m for m in ('textual','rich','plotext','tui') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
