"""Tokenizers (offline GPT-2 BPE, char level) and the token cache / windows."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from engine.data import TextData, build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
from engine.errors import DataError, GptTuiError
from engine.tokenizer import CharTokenizer, GPT2Tokenizer, tokenizer_from_spec
from tests.conftest import shared


def test_gpt2_tokenizer_works_without_network(monkeypatch: pytest.MonkeyPatch):
    def no_network(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    from engine.tokenizer import gpt2_encoding

    gpt2_encoding.cache_clear()
    tok = GPT2Tokenizer()
    ids = tok.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces")
    # The book's ch02 example ids.
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert tok.decode(ids).startswith("Hello, do you like tea?")


def test_gpt2_counts_the_verdict_as_the_book_does():
    text = shared("the-verdict.txt").read_text(encoding="utf-8")
    assert len(GPT2Tokenizer().encode(text)) == 5145


def test_gpt2_byte_pieces_of_chinese():
    tok = GPT2Tokenizer()
    ids = tok.encode("词")
    assert len(ids) > 1
    assert any(tok.piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == "词"


def test_char_tokenizer_round_trip_and_unknown_chars():
    tok = CharTokenizer("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    with pytest.raises(GptTuiError, match="outside the char vocabulary"):
        tok.encode("hexz")
    again = tokenizer_from_spec(tok.spec())
    assert again.encode("world") == tok.encode("world")


def test_char_tokenizer_on_chinese_ci():
    path = shared("ci", "ci.txt")
    tok = build_char_tokenizer([str(path)])
    assert tok.vocab_size == 5724
    line = path.read_text(encoding="utf-8").splitlines()[1]
    assert tok.decode(tok.encode(line)) == line
    assert tokenizer_from_spec(tok.spec()).decode(tok.encode(line)) == line


def test_token_cache_is_memory_mapped_and_reused(corpus: Path):
    tok = GPT2Tokenizer()
    calls = []
    path = tokenize_to_cache([str(corpus)], tok, lambda d, t: calls.append((d, t)))
    tokens = load_tokens(path)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert tokens.tolist() == tok.encode(corpus.read_text())
    assert calls and calls[-1][0] == calls[-1][1]
    calls.clear()
    assert tokenize_to_cache([str(corpus)], tok, lambda d, t: calls.append(1)) == path
    assert calls == []  # second time: from the cache


def test_char_tokens_use_uint32_for_large_vocab(tmp_path: Path):
    p = tmp_path / "big.txt"
    p.write_text("".join(chr(0x20000 + i) for i in range(66000)), encoding="utf-8")
    tok = build_char_tokenizer([str(p)])
    assert tok.vocab_size == 66000
    tokens = load_tokens(tokenize_to_cache([str(p)], tok))
    assert tokens.dtype == np.uint32 and int(tokens[-1]) == 65999
    assert tok.decode(tokens[:5].tolist()) == p.read_text(encoding="utf-8")[:5]


def test_folder_and_multiple_files(tmp_path: Path):
    d = tmp_path / "books"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 50)
    (d / "b.md").write_text("beta " * 50)
    (d / "image.png").write_bytes(b"\x89PNG")
    files = resolve_sources([str(d)])
    assert [Path(f).name for f in files] == ["a.txt", "b.md"]


def test_windows_follow_the_book():
    tokens = np.arange(100, dtype=np.uint16)
    data = TextData(tokens, context=8, stride=4, val_ratio=0.2, seed=0)
    assert data.train.n_windows == len(range(0, 80 - 8, 4))
    x, y = data.train.batch(np.array([0, 2]))
    assert x.tolist()[1] == list(range(8, 16)) and y.tolist()[1] == list(range(9, 17))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    a = TextData(tokens, 8, 8, 0.1, seed=1)
    b = TextData(tokens, 8, 8, 0.1, seed=1)
    assert (a.order(3) == b.order(3)).all() and not (a.order(3) == a.order(4)).all()
    assert sorted(a.order(0).tolist()) == list(range(a.train.n_windows))


def test_ranks_split_the_global_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    d = TextData(tokens, 8, 8, 0.1, seed=1)
    whole, _ = d.train_batch(0, 0, 4)
    r0, _ = d.train_batch(0, 0, 2, rank=0, world=2)
    r1, _ = d.train_batch(0, 0, 2, rank=1, world=2)
    assert whole.tolist() == r0.tolist() + r1.tolist()


def test_too_short_split_names_the_numbers():
    with pytest.raises(DataError, match=r"val split has 10 tokens, context is 32: lower --context or raise --val-ratio"):
        TextData(np.arange(100, dtype=np.uint16), context=32, stride=32, val_ratio=0.1, seed=0)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"abc\x00\x01\x02", "looks binary"), (b"caf\xe9 au lait " * 10, "not UTF-8")],
)
def test_bad_data_files(tmp_path: Path, content: bytes, message: str):
    p = tmp_path / "bad.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        resolve_sources([str(p)])


def test_missing_file_and_unknown_corpus(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_sources([str(tmp_path / "nope.txt")])


def test_embedded_default_corpus_is_offline():
    files = resolve_sources([])
    text = Path(files[0]).read_text(encoding="utf-8")
    assert len(text) > 300_000 and "assert" in text


def test_named_corpus_fails_offline_with_a_clear_message(monkeypatch: pytest.MonkeyPatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download corpus 'the-verdict'.*pass the file with --data"):
        resolve_sources(["the-verdict"])


def test_named_corpus_checksum(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import io
    import urllib.request

    text = shared("the-verdict.txt").read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(text))
    path = resolve_sources(["the-verdict"])[0]
    assert Path(path).read_bytes() == text
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered"))
    Path(path).unlink()
    with pytest.raises(DataError, match="sha256"):
        resolve_sources(["the-verdict"])
