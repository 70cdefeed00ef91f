"""``gpt-tui export --format hf``: transformers loads the folder and computes what gpt-tui computes."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine.errors import GptTuiError
from engine.hf_export import export_hf, export_model
from engine.inference import load_for_inference
from engine.model import GPT, ModelConfig
from engine.sampling import SampleSettings, generate_stream
from engine.tokenizer import CharTokenizer, GPT2Tokenizer, gpt2_vocab_files
from engine.trainer import Trainer
from engine.weights import model_from_checkpoint

from .conftest import SMALL_TEXT, run_cli, shared, tiny_config
from .gpt2_fixtures import finetune_trainer, tiny_gpt2_checkpoint
from .test_instruct import finetune_config, make_records, write_records

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPT = "It had always been his fate"
TRICKY = ("Hello, world!  Don't panic -- it's 3.14159 o'clock.\n\n\tTabs,   spaces\r\nand ünïcödé: 词语 😀 e\u0301."
          "<|endoftext|>The end ")
CHAR_TEXT = SMALL_TEXT + "\n\tTabs and  spaces, don't,\r\nnewlines\n\nünïcödé 词语 😀 e\u0301 <unk> [UNK] end\n"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


def load_hf(folder: Path):
    """GPT2LMHeadModel.from_pretrained, with its loading report and every warning it logged."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.GPT2LMHeadModel.from_pretrained(str(folder), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    said = handler.messages + [str(w.message) for w in caught]
    return model.eval(), info, said


def assert_clean_load(info: dict, said: list[str]) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info.get("error_msgs")
    about_weights = [m for m in said if any(w in m.lower() for w in ("weight", "initializ", "not used", "missing"))]
    assert not about_weights, about_weights


def our_greedy(model: GPT, ids: list[int], n: int, eot: int | None) -> list[int]:
    out: list[int] = []
    settings = SampleSettings(max_new_tokens=n, temperature=0.0, top_k=None)
    for t in generate_stream(model, torch.tensor([ids]), settings, eot):
        out.append(int(t[0]))
        if eot is not None and out[-1] == eot:
            break
    return out


# ------------------------------------------------------------ a GPT-2 BPE run
@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny run with GPT-2's tokenizer (small preset: untied head, no qkv bias), exported with the CLI."""
    tmp = tmp_path_factory.mktemp("hf_gpt2")
    corpus = tmp / "corpus.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    cfg = tiny_config(corpus, tmp / "run", preset="small", tokenizer="gpt2", context=16, n_layer=1, n_head=2,
                      n_embd=32, max_steps=3, lr=1e-2, eval_every=3)
    t = Trainer(cfg)
    t.setup()
    assert t.fit() == "finished"
    out = tmp / "hf"
    r = run_cli("export", str(tmp / "run"), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lm = load_for_inference(str(tmp / "run"), "cpu")
    return {"tmp": tmp, "run": tmp / "run", "out": out, "stdout": r.stdout, "lm": lm}


def test_export_writes_the_hf_folder(gpt2_run: dict) -> None:
    out = gpt2_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"])
    assert str(out) in gpt2_run["stdout"] and "GPT-2 BPE" in gpt2_run["stdout"]
    cfg = json.loads((out / "config.json").read_text())
    mcfg = gpt2_run["lm"].model.cfg
    assert (cfg["model_type"], cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (
        "gpt2", 50257, 16, 32, 1, 2)
    assert cfg["tie_word_embeddings"] is False and mcfg.tie_weights is False and mcfg.qkv_bias is False
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == 50256
    # vocab.json and merges.txt are OpenAI's files, unchanged
    vocab_bpe, encoder_json = gpt2_vocab_files()
    assert (out / "vocab.json").read_bytes() == Path(encoder_json).read_bytes()
    assert (out / "merges.txt").read_bytes() == Path(vocab_bpe).read_bytes()
    assert hashlib.sha256((out / "merges.txt").read_bytes()).hexdigest().startswith("1ce1664773c5")


def test_transformers_loads_it_cleanly_with_equal_logits(gpt2_run: dict) -> None:
    hf, info, said = load_hf(gpt2_run["out"])
    assert_clean_load(info, said)
    from safetensors import safe_open

    with safe_open(str(gpt2_run["out"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" in names  # untied head
        assert torch.equal(f.get_tensor("transformer.h.0.attn.c_attn.bias"), torch.zeros(96))  # no qkv bias: zeros
    ours = gpt2_run["lm"].model
    ids = GPT2Tokenizer().encode(SMALL_TEXT)[:64]
    x = torch.tensor(ids).view(4, 16)
    with torch.no_grad():
        a, b = ours(x), hf(x).logits
    assert a.shape == b.shape == (4, 16, 50257)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.equal(a[0, 0], a[0, 1])  # a real model, not a constant


def test_greedy_generation_matches(gpt2_run: dict) -> None:
    hf, _, _ = load_hf(gpt2_run["out"])
    ours = gpt2_run["lm"].model
    tok = GPT2Tokenizer()
    ids = tok.encode(PROMPT)
    n = 16 - len(ids)
    expected = our_greedy(ours, ids, n, tok.eot_id)
    with torch.no_grad():
        got = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=tok.eot_id)
    assert got[0, len(ids):].tolist() == expected
    assert len(expected) > 1


def test_auto_tokenizer_encodes_and_decodes_as_ours(gpt2_run: dict) -> None:
    import tokenizers

    at = transformers.AutoTokenizer.from_pretrained(str(gpt2_run["out"]))
    fast = tokenizers.Tokenizer.from_file(str(gpt2_run["out"] / "tokenizer.json"))  # tokenizer.json on its own
    ours = GPT2Tokenizer()
    texts = [TRICKY, SMALL_TEXT[:2000], " leading space", "trailing  \n", "\n\n\n", "a" * 300, "'s 've 'll'd"]
    try:
        texts.append(shared("the-verdict.txt").read_text(encoding="utf-8"))
    except pytest.skip.Exception:
        pass
    for text in texts:
        ids = ours.encode(text)
        assert at(text)["input_ids"] == ids, text[:40]
        assert fast.encode(text).ids == ids, text[:40]
        assert at.decode(ids) == ours.decode(ids) == text
    assert at.eos_token == "<|endoftext|>" and at.eos_token_id == 50256
    assert at.model_max_length == 16


def test_import_gpt2_gives_the_same_weights_back(gpt2_run: dict) -> None:
    back = gpt2_run["tmp"] / "back.pt"
    r = run_cli("import-gpt2", str(gpt2_run["out"]), "--out", str(back))
    assert r.returncode == 0, r.stderr
    got = ck.load_checkpoint(str(back)).model
    want = gpt2_run["lm"].model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    extra = set(got) - set(want)
    assert extra == {"blocks.0.attn.qkv.bias"} and not got["blocks.0.attn.qkv.bias"].any()  # the zeros written


def test_tied_head_with_qkv_bias(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=50257, context_length=24, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
                            qkv_bias=True, tie_weights=True)).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases and LayerNorms away from their init, so a misplaced one shows
            p.add_(torch.randn_like(p) * 0.05)
    export_model(model, GPT2Tokenizer(), str(tmp_path / "hf"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    hf, info, said = load_hf(tmp_path / "hf")
    assert_clean_load(info, said)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    x = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ char level
@pytest.fixture(scope="module")
def char_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("hf_char")
    corpus = tmp / "corpus.txt"
    corpus.write_text(CHAR_TEXT, encoding="utf-8", newline="")
    t = Trainer(tiny_config(corpus, tmp / "run", max_steps=3, eval_every=3, lr=1e-2))
    t.setup()
    assert t.fit() == "finished"
    r = export_hf(str(tmp / "run"), str(tmp / "hf"))
    return {"tmp": tmp, "run": tmp / "run", "out": tmp / "hf", "result": r, "lm": load_for_inference(str(tmp / "run"), "cpu")}


def test_char_tokenizer_round_trips_like_ours(char_run: dict) -> None:
    ours = char_run["lm"].tokenizer
    assert isinstance(ours, CharTokenizer) and {"\r", "\n", "\t", "😀", "\u0301", "词"} <= set(ours.chars)
    assert char_run["result"].tokenizer == "char"
    assert sorted(p.name for p in char_run["out"].iterdir()) == sorted(
        ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"])
    at = transformers.AutoTokenizer.from_pretrained(str(char_run["out"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(char_run["out"] / "tokenizer.json"))
    samples = [CHAR_TEXT, "词语 😀\n", "\r\n\r\n", "  two  spaces ", "e\u0301", "<unk>", "[UNK]", " . , ' ", "\t"]
    for text in samples:
        ids = ours.encode(text)
        for tk in (at, fast):
            assert tk(text)["input_ids"] == ids, repr(text[:30])
            assert tk.decode(ids) == ours.decode(ids) == text, repr(text[:30])
    assert at.decode(list(range(ours.vocab_size))) == "".join(ours.chars)
    with pytest.raises(GptTuiError):  # a character outside the vocabulary is an error in both
        ours.encode("xyz§")
    with pytest.raises(Exception, match="(?i)unk"):
        at("xyz§")


def test_char_model_logits_and_greedy_match(char_run: dict) -> None:
    hf, info, said = load_hf(char_run["out"])
    assert_clean_load(info, said)
    cfg = json.loads((char_run["out"] / "config.json").read_text())
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None and cfg["vocab_size"] == hf.config.vocab_size
    ours = char_run["lm"].model
    ids = char_run["lm"].tokenizer.encode(CHAR_TEXT[:32])
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours(torch.tensor([ids])), rtol=1e-5, atol=1e-5)
        got = hf.generate(torch.tensor([ids[:8]]), attention_mask=torch.ones(1, 8, dtype=torch.long), do_sample=False,
                          max_new_tokens=20)
    assert got[0, 8:].tolist() == our_greedy(ours, ids[:8], 20, None)


def test_char_export_cannot_be_imported_as_gpt2(char_run: dict) -> None:
    r = run_cli("import-gpt2", str(char_run["out"]), "--out", str(char_run["tmp"] / "x.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fewer than GPT-2's tokenizer" in r.stderr


# ------------------------------------------------------------------------ LoRA
def test_lora_checkpoint_exports_merged(tmp_path: Path) -> None:
    init = tiny_gpt2_checkpoint(tmp_path / "init.pt", n_layer=1)
    data = write_records(tmp_path / "data.json", make_records(24))
    cfg = finetune_config(tmp_path, init, data, lora_rank=4, lora_alpha=8.0, lora_layers="attn,mlp,head", lr=2e-2,
                          max_steps=3, sample_every="0", test_responses=0)
    t = finetune_trainer(cfg)
    t.setup()
    assert t.fit() == "finished"
    run = tmp_path / "run"
    assert ck.load_checkpoint(str(run)).kind == "lora"
    r = run_cli("export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert "merged LoRA adapters" in r.stdout
    hf, info, said = load_hf(tmp_path / "hf")
    assert_clean_load(info, said)
    merged = model_from_checkpoint(ck.load_checkpoint(str(run))).eval()
    base = model_from_checkpoint(ck.load_checkpoint(str(init))).eval()
    x = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(x).logits
        torch.testing.assert_close(got, merged(x), rtol=1e-5, atol=1e-5)
        assert (got - base(x)).abs().max() > 1e-3  # the adapters are in
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False  # head adapted


# ---------------------------------------------------------------- refusals
def test_bigram_is_refused_with_one_line(tmp_path: Path, corpus: Path) -> None:
    t = Trainer(tiny_config(corpus, tmp_path / "run", preset="bigram", max_steps=2, eval_every=2))
    t.setup()
    assert t.fit() == "finished"
    r = run_cli("export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 2, r.stdout
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("gpt-tui: error: the bigram baseline") and "--format gpt-tui" in r.stderr
    assert not (tmp_path / "hf").exists()
    r = run_cli("export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown export format 'onnx'" in r.stderr


def test_what_gpt2_cannot_hold_is_refused(tmp_path: Path) -> None:
    def fresh() -> GPT:
        return GPT(ModelConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0))

    tok = CharTokenizer("".join(chr(65 + i) for i in range(50)))
    m = fresh()
    m.ln_f.eps = 1e-6
    with pytest.raises(GptTuiError, match="LayerNorm ln_f .*cannot be expressed in GPT-2's layout"):
        export_model(m, tok, str(tmp_path / "a"))
    m = fresh()
    m.register_parameter("gate", torch.nn.Parameter(torch.ones(8)))
    with pytest.raises(GptTuiError, match="tensor gate cannot be expressed"):
        export_model(m, tok, str(tmp_path / "b"))
    m = fresh()
    m.head = torch.nn.Linear(8, 50, bias=True)
    with pytest.raises(GptTuiError, match="tensor head.bias cannot be expressed"):
        export_model(m, tok, str(tmp_path / "c"))
    assert not any((tmp_path / d).exists() for d in "abc")
    # an occupied folder is not mixed into
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pytorch_model.bin").write_bytes(b"old")
    with pytest.raises(GptTuiError, match=r"already holds other files \(pytorch_model.bin\)"):
        export_model(fresh(), tok, str(tmp_path / "d"))
