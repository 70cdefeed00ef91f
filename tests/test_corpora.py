"""Corpora as they are distributed: .jsonl(.gz) and parquet shards, globs, folders, `gpt-tui prepare`."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from engine import data as data_mod
from engine.data import (
    build_char_tokenizer,
    load_tokens,
    resolve_sources,
    token_cache_path,
    tokenize_to_cache,
)
from engine.errors import DataError
from engine.tokenizer import GPT2Tokenizer
from tests.conftest import run_cli, tiny_config

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

EOT = 50256


def docs(prefix: str, n: int = 60) -> list[str]:
    return [f"{prefix} story {i}: the cat sat on the mat and looked at the {i % 7} birds. " * 3 for i in range(n)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts))
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str], row_group: int = 20) -> Path:
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), str(path), row_group_size=row_group)
    return path


def expected(*doc_lists: list[str]) -> list[int]:
    """Documents encoded and joined by end-of-text, in order."""
    enc = GPT2Tokenizer().enc
    out: list[int] = []
    for d in (d for lst in doc_lists for d in lst):
        if out:
            out.append(EOT)
        out.extend(enc.encode_ordinary(d))
    return out


@pytest.fixture
def shards(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    d = tmp_path / "shards"
    d.mkdir()
    a, b, c = docs("alpha"), docs("beta"), docs("gamma")
    return {"jsonl": (write_jsonl(d / "a.jsonl", a), a), "gz": (write_jsonl(d / "b.jsonl.gz", b), b),
            "parquet": (write_parquet(d / "c.parquet", c), c)}


def test_jsonl_gz_parquet_documents_separated_by_end_of_text(shards):
    files = [str(shards[k][0]) for k in ("jsonl", "gz", "parquet")]
    tokens = load_tokens(tokenize_to_cache(files, GPT2Tokenizer(), workers=2))
    assert tokens.tolist() == expected(*(shards[k][1] for k in ("jsonl", "gz", "parquet")))
    meta = json.loads(Path(token_cache_path(files, GPT2Tokenizer()) + ".json").read_text())
    assert meta["documents"] == 180


def test_parallel_text_file_split_matches_one_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    p = tmp_path / "book.txt"
    p.write_text("".join(f"Line {i} of the book, with words.\n" for i in range(3000)), encoding="utf-8")
    monkeypatch.setattr("engine.corpora.UNIT_BYTES", 10_000)
    from engine import corpora

    assert len(corpora.units_of(str(p), "text", 10_000)) > 5
    tok = GPT2Tokenizer()
    one = load_tokens(tokenize_to_cache([str(p)], tok, workers=1)).tolist()
    assert one == tok.enc.encode_ordinary(p.read_text(encoding="utf-8"))
    monkeypatch.setenv("GPT_TUI_CACHE", str(tmp_path / "c2"))
    ranges = corpora.units_of(str(p), "text", 10_000)
    pieces = [corpora.unit_documents(u, "text")[0] for u in ranges]
    assert "".join(pieces) == p.read_text(encoding="utf-8")  # ranges cut at line ends, nothing lost or doubled


def test_glob_and_folder_mix(tmp_path: Path, shards):
    (tmp_path / "shards" / "notes.txt").write_text("plain text notes\n" * 20)
    (tmp_path / "shards" / "instructions.json").write_text("[]")
    got = [Path(f).name for f in resolve_sources([str(tmp_path / "shards")])]
    assert got == ["a.jsonl", "b.jsonl.gz", "c.parquet", "notes.txt"]  # a .json in a folder is not data
    got = [Path(f).name for f in resolve_sources([str(tmp_path / "shards" / "*.json*")])]
    assert got == ["a.jsonl", "b.jsonl.gz"]
    with pytest.raises(DataError, match="no data files match"):
        resolve_sources([str(tmp_path / "shards" / "*.arrow")])


def test_plain_json_is_refused_with_the_way_out(tmp_path: Path):
    p = tmp_path / "data.json"
    p.write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(DataError, match=r"finetune"):
        resolve_sources([str(p)])
    with pytest.raises(DataError, match=r"corpus 'alpaca' \(instruction-data.json\) is a .json file.*finetune"):
        resolve_sources(["alpaca"])  # refused before anything is downloaded


def test_text_field_errors_name_the_fields_present(shards):
    with pytest.raises(DataError, match=r"no field 'body' \(fields: text, id\)"):
        resolve_sources([str(shards["parquet"][0])]) and data_mod.units_of(str(shards["parquet"][0]), "body")
    with pytest.raises(DataError, match=r"a.jsonl line 1: no field 'body' \(fields: text, id\)"):
        tokenize_to_cache([str(shards["jsonl"][0])], GPT2Tokenizer(), text_field="body", workers=1)


def test_other_text_field(tmp_path: Path):
    p = write_jsonl(tmp_path / "c.jsonl", ["hello there", "general kenobi"], field="content")
    tokens = load_tokens(tokenize_to_cache([str(p)], GPT2Tokenizer(), text_field="content"))
    assert tokens.tolist() == expected(["hello there", "general kenobi"])


def test_bad_json_line_named_and_finished_files_kept(tmp_path: Path, shards):
    bad = tmp_path / "shards" / "d.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut off\n')
    files = [str(shards["jsonl"][0]), str(bad)]
    with pytest.raises(DataError, match=r"d.jsonl line 2 is not a JSON object"):
        tokenize_to_cache(files, GPT2Tokenizer(), workers=2)
    parts = list(Path(data_mod.cache_dir(), "tokens", "parts").glob("*.bin"))
    assert len(parts) == 1  # a.jsonl's part was finished and is kept; no temporary file left
    assert not list(Path(data_mod.cache_dir(), "tokens").rglob("*.tmp*"))
    bad.write_text(json.dumps({"text": "fine"}) + "\n")
    done = []
    tokens = load_tokens(tokenize_to_cache(files, GPT2Tokenizer(), stats=done.append, workers=2))
    assert done[0].reused_bytes == shards["jsonl"][0].stat().st_size  # resumed: a.jsonl not tokenized again
    assert tokens.tolist() == expected(shards["jsonl"][1], ["fine"])


def test_truncated_gzip_and_corrupt_parquet(tmp_path: Path, shards):
    gz = shards["gz"][0]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz is corrupt or truncated after line \d+"):
        tokenize_to_cache([str(cut)], GPT2Tokenizer(), workers=1)
    pqf = shards["parquet"][0]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(pqf.read_bytes()[: pqf.stat().st_size // 2])
    with pytest.raises(DataError, match=r"broken.parquet is corrupt or truncated"):
        tokenize_to_cache([str(broken)], GPT2Tokenizer())
    raw = bytearray(pqf.read_bytes())
    raw[200:1200] = b"\x00" * 1000  # damage the pages of the first row groups, keep the footer
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"damaged.parquet row group \d+ is corrupt"):
        tokenize_to_cache([str(damaged)], GPT2Tokenizer(), workers=1)


def test_char_level_separates_documents_by_a_blank_line(shards):
    files = [str(shards["jsonl"][0])]
    tok = build_char_tokenizer(files)
    tokens = load_tokens(tokenize_to_cache(files, tok))
    assert tok.decode(tokens.tolist()) == "\n\n".join(shards["jsonl"][1])


def test_prepare_then_train_reuses_the_cache(tmp_path: Path, shards, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    files = [str(shards[k][0]) for k in ("jsonl", "gz", "parquet")]
    r = run_cli("prepare", *files, "--tokenizer", "gpt2", "--out", str(cache), "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert "tokens" in r.stderr and "MB/s" in r.stderr and "ETA" in r.stderr and "docs" in r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent.parent == cache and len(np.fromfile(path, dtype=np.uint16)) == len(expected(
        *(shards[k][1] for k in ("jsonl", "gz", "parquet"))))
    monkeypatch.setenv("GPT_TUI_CACHE", str(cache))

    def no_tokenizing(*a, **k):
        raise AssertionError("train tokenized again")

    monkeypatch.setattr(data_mod._Job, "run", no_tokenizing)
    from engine.trainer import Trainer

    cfg = tiny_config(shards["jsonl"][0], tmp_path / "run", tokenizer="gpt2", max_steps=2, context=16,
                      batch_size=2, eval_every=2)
    cfg.data = files
    t = Trainer(cfg)
    t.setup()
    assert t.fit() == "finished"
    assert t.data.n_tokens == len(np.fromfile(path, dtype=np.uint16))


def test_train_cli_on_parquet_and_bad_field(tmp_path: Path, shards):
    pqf = str(shards["parquet"][0])
    r = run_cli("train", "--data", pqf, "--headless", "--preset", "tiny", "--tokenizer", "char", "--context", "16",
                "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "2", "--max-steps", "2",
                "--eval-every", "2", "--eval-batches", "1", "--sample-every", "0", "--device", "cpu",
                "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--data", pqf, "--headless", "--text-field", "body", "--max-steps", "1",
                "--out", str(tmp_path / "run2"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        f"gpt-tui: error: parquet file {pqf} has no field 'body' (fields: text, id): choose one with --text-field NAME")
    assert "Traceback" not in r.stderr


def test_missing_pyarrow_is_one_line_naming_the_extra(shards, monkeypatch: pytest.MonkeyPatch):
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"pip install 'gpt-tui\[data\]'"):
        resolve_sources([str(shards["parquet"][0])]) and data_mod.units_of(str(shards["parquet"][0]), "text")


def test_vocabulary_copy_in_the_cache_is_checked(tmp_path: Path):
    from engine import tokenizer as tk

    tk.gpt2_encoding.cache_clear()
    first = tk.gpt2_encoding().encode_ordinary("Hello, do you like tea?")
    copy = Path(tk._ranks_path())
    assert copy.exists()
    tk.gpt2_encoding.cache_clear()
    assert tk.gpt2_encoding().encode_ordinary("Hello, do you like tea?") == first == [15496, 11, 466, 345, 588, 8887, 30]
    raw = bytearray(copy.read_bytes())
    raw[-5] ^= 0xFF  # a damaged copy is ignored and rewritten
    copy.write_bytes(bytes(raw))
    assert tk._cached_ranks() is None
    tk.gpt2_encoding.cache_clear()
    assert tk.gpt2_encoding().encode_ordinary("Hello, do you like tea?") == first
    assert tk._cached_ranks() is not None


def test_jsonl_gz_is_streamed_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    texts = docs("delta", 200)
    gz = write_jsonl(tmp_path / "big.jsonl.gz", texts)
    monkeypatch.setattr("engine.corpora.UNIT_BYTES", 2000)  # many batches of a few lines
    tokens = load_tokens(tokenize_to_cache([str(gz)], GPT2Tokenizer(), workers=1))
    assert tokens.tolist() == expected(texts)
    assert not list(Path(data_mod.cache_dir(), "tokens", "parts").glob(".unit-*"))
    lines = gzip.decompress(gz.read_bytes()).decode().splitlines()
    lines[150] = "not json"
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(DataError, match=r"bad.jsonl.gz line 151 is not a JSON object"):
        tokenize_to_cache([str(bad)], GPT2Tokenizer(), workers=2)
    assert not list(Path(data_mod.cache_dir(), "tokens", "parts").glob(".unit-*"))
