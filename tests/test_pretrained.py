"""GPT-2 import: both on-disk formats, logits against a reference forward, errors, --init, the CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import CheckpointError, GptTuiError
from engine.pretrained import load_gpt2, open_source
from engine.tf_checkpoint import TFCheckpoint, crc32c, masked_crc32c, read_index
from engine.weights import init_context_length, load_init_model

from .conftest import run_cli, tiny_config
from .gpt2_fixtures import (
    HP,
    hf_to_tf_names,
    random_gpt2,
    reference_logits,
    write_hf,
    write_tf,
    write_tf_bundle,
)

TF_FIXTURE = Path(__file__).parent / "data" / "tf_gpt2_tiny"
IDS = [464, 3290, 318, 257, 1332, 13, 50256, 1, 0, 31373, 11, 995]


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    return random_gpt2(HP, seed=0)


def our_logits(model, ids: list[int]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


def _fixture_maker():
    """The script that made tests/data/tf_gpt2_tiny (its shapes and value formula, no TensorFlow)."""
    spec = importlib.util.spec_from_file_location("make_tf", TF_FIXTURE / "make_with_tensorflow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------- TF reader
def test_crc32c_known_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_tf_reader_reads_a_checkpoint_saved_by_tensorflow() -> None:
    """tests/data/tf_gpt2_tiny was written by TensorFlow's own Saver (see make_with_tensorflow.py)."""
    mod = _fixture_maker()
    ckpt = TFCheckpoint(str(TF_FIXTURE / "model.ckpt"))
    expected = mod.shapes(mod.HPARAMS)
    assert ckpt.shapes() == {k: tuple(v) for k, v in expected.items()}
    for k, (name, shape) in enumerate(sorted(expected.items())):
        got = ckpt.get(name)
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), mod.expected_value(k, shape))


def test_tf_reader_reads_multi_block_prefix_compressed_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    tensors = {f"model/h{i}/attn/c_attn/{leaf}": rng.standard_normal((1, 3, 5) if leaf == "w" else (5,)).astype(np.float32)
               for i in range(12) for leaf in ("w", "b")}
    tensors["model/wte"] = rng.standard_normal((7, 3)).astype(np.float32)
    write_tf_bundle(tmp_path / "model.ckpt", tensors, block_bytes=120)
    header, entries = read_index(str(tmp_path / "model.ckpt.index"))
    assert header[1] == [1]
    assert sorted(entries) == sorted(tensors)
    ckpt = TFCheckpoint(str(tmp_path / "model.ckpt"))
    for name, value in tensors.items():
        np.testing.assert_array_equal(ckpt.get(name).numpy(), value)


def test_tf_reader_rejects_a_corrupt_index(tmp_path: Path) -> None:
    write_tf_bundle(tmp_path / "model.ckpt", {"model/wte": np.ones((4, 2), np.float32)})
    p = tmp_path / "model.ckpt.index"
    raw = bytearray(p.read_bytes())
    raw[5] ^= 0xFF  # inside the first data block
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="crc32c"):
        TFCheckpoint(str(tmp_path / "model.ckpt"))
    p.write_bytes(b"not a table at all, clearly" * 3)
    with pytest.raises(CheckpointError, match="not a TensorFlow checkpoint index"):
        TFCheckpoint(str(tmp_path / "model.ckpt"))


def test_masked_crc_matches_fixture_written_by_tensorflow() -> None:
    data = (TF_FIXTURE / "model.ckpt.index").read_bytes()
    # the footer's index handle points at a block whose trailer TensorFlow wrote
    from engine.tf_checkpoint import _handle

    _, _, pos = _handle(data[-48:])
    off, size, _ = _handle(data[-48:], pos)
    stored = int.from_bytes(data[off + size + 1: off + size + 5], "little")
    assert masked_crc32c(data[off:off + size + 1]) == stored


# ---------------------------------------------------------- logits
@pytest.mark.parametrize("variant", ["safetensors", "bin-prefixed", "safetensors-buffers", "sharded",
                                     "bin-legacy"])
def test_hf_import_matches_reference_logits(tmp_path: Path, tensors, variant: str) -> None:
    if variant == "safetensors":
        folder = write_hf(tmp_path / "hf", tensors)
    elif variant == "bin-prefixed":
        folder = write_hf(tmp_path / "hf", tensors, fmt="bin", prefix="transformer.", lm_head=True)
    elif variant == "bin-legacy":
        folder = write_hf(tmp_path / "hf", tensors, fmt="bin-legacy")
    elif variant == "sharded":
        folder = write_hf(tmp_path / "hf", tensors, fmt="sharded")
    else:
        folder = write_hf(tmp_path / "hf", tensors, mask_buffers=True)
    model, src = load_gpt2(str(folder), dropout=0.0)
    assert src.format == "hf"
    cfg = model.cfg
    assert (cfg.vocab_size, cfg.context_length, cfg.n_layer, cfg.n_head, cfg.n_embd) == (50257, 32, 2, 4, 32)
    assert cfg.qkv_bias and cfg.tie_weights and model.head.weight is model.tok_emb.weight
    ref = reference_logits(tensors, HP, IDS)
    np.testing.assert_allclose(our_logits(model, IDS), ref, rtol=1e-4, atol=2e-4)


def test_tf_import_matches_reference_logits_and_hf(tmp_path: Path, tensors) -> None:
    tf_model, src = load_gpt2(str(write_tf(tmp_path / "tf", tensors)), dropout=0.0)
    assert src.format == "tf"
    hf_model, _ = load_gpt2(str(write_hf(tmp_path / "hf", tensors)), dropout=0.0)
    ref = reference_logits(tensors, HP, IDS)
    np.testing.assert_allclose(our_logits(tf_model, IDS), ref, rtol=1e-4, atol=2e-4)
    a, b = tf_model.state_dict(), hf_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorflow_written_fixture_matches_reference_logits() -> None:
    mod = _fixture_maker()
    ckpt = TFCheckpoint(str(TF_FIXTURE / "model.ckpt"))
    hf_names = random_gpt2(mod.HPARAMS)  # only the names are used
    tf_of = dict(zip(hf_names, hf_to_tf_names(hf_names), strict=True))
    hf_named = {hf: ckpt.get(tf).numpy().reshape(hf_names[hf].shape) for hf, tf in tf_of.items()}
    model, _ = load_gpt2(str(TF_FIXTURE), dropout=0.0)
    ids = [1, 5, 7, 90, 3, 3, 0]
    np.testing.assert_allclose(our_logits(model, ids), reference_logits(hf_named, mod.HPARAMS, ids), rtol=1e-4,
                               atol=1e-4)


# ---------------------------------------------------------- errors
def test_missing_tensor_is_named(tmp_path: Path, tensors) -> None:
    t = dict(tensors)
    del t["h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"tensor h\.1\.mlp\.c_fc\.bias is missing"):
        load_gpt2(str(write_hf(tmp_path / "hf", t)))
    with pytest.raises(CheckpointError, match=r"tensor model/h1/mlp/c_fc/b is missing"):
        load_gpt2(str(write_tf(tmp_path / "tf", t)))


def test_wrong_shape_is_named(tmp_path: Path, tensors) -> None:
    t = dict(tensors)
    t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"].T.copy()  # (out, in): not Conv1D's layout
    with pytest.raises(CheckpointError, match=r"tensor h\.0\.attn\.c_attn\.weight .* shape \[96, 32\], expected \[32, 96\]"):
        load_gpt2(str(write_hf(tmp_path / "hf", t)))


def test_unexpected_tensor_is_named(tmp_path: Path, tensors) -> None:
    t = dict(tensors, **{"h.0.attn.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor h\.0\.attn\.extra\.weight"):
        load_gpt2(str(write_hf(tmp_path / "hf", t)))
    tf = write_tf(tmp_path / "tf", tensors)
    extra = hf_to_tf_names(tensors)
    extra["model/h0/attn/c_attn/w_extra"] = np.zeros(3, np.float32)
    write_tf_bundle(tf / "model.ckpt", extra)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model/h0/attn/c_attn/w_extra"):
        load_gpt2(str(tf))


def test_not_a_gpt2_folder(tmp_path: Path) -> None:
    with pytest.raises(GptTuiError, match="not a GPT-2 weights folder"):
        open_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(GptTuiError, match="'llama' model, not GPT-2"):
        open_source(str(tmp_path))


# ---------------------------------------------------------- --init and the CLI
def test_init_context_default_and_limit(tmp_path: Path, tensors, corpus: Path) -> None:
    folder = write_hf(tmp_path / "hf", tensors)
    assert init_context_length(str(folder)) == HP["n_ctx"]
    cfg = tiny_config(corpus, tmp_path / "run", tokenizer="auto", context=64)
    with pytest.raises(GptTuiError, match=r"--context 64 is longer than the position table .* \(32 positions\)"):
        load_init_model(str(folder), cfg.dropout, cfg.context)

    from engine.trainer import Trainer

    cfg = tiny_config(corpus, tmp_path / "run2", tokenizer="auto", context=None, init=str(folder), max_steps=2,
                      eval_every=0, batch_size=2)
    t = Trainer(cfg)
    t.setup()
    assert t.context == HP["n_ctx"] and t.tokenizer.name == "gpt2"
    assert t.model.cfg.n_embd == HP["n_embd"]
    assert t.fit() == "finished"


def test_cli_import_then_generate_and_init(tmp_path: Path, tensors) -> None:
    folder = write_tf(tmp_path / "tf", tensors)
    out = tmp_path / "gpt2.pt"
    r = run_cli("import-gpt2", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "OpenAI TensorFlow" in r.stdout and str(out) in r.stdout
    from engine.checkpoint import load_checkpoint

    obj = load_checkpoint(str(out))
    assert obj.kind == "full" and obj.tokenizer == {"type": "gpt2"} and obj.optimizer is None
    model = load_init_model(str(out))
    np.testing.assert_allclose(our_logits(model, IDS), reference_logits(tensors, HP, IDS), rtol=1e-4, atol=2e-4)
    r = run_cli("generate", str(out), "--prompt", "Hello", "-n", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()

    r = run_cli("import-gpt2", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
