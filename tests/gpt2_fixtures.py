"""Small random GPT-2 models written in the real on-disk formats, and a reference forward.

* :func:`write_hf` writes a Hugging Face folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) with GPT2 tensor names and Conv1D (in, out) layouts.
* :func:`write_tf` writes OpenAI's TensorFlow layout (``hparams.json``, ``checkpoint``,
  ``model.ckpt.index`` + ``model.ckpt.data-00000-of-00001``): a LevelDB-format table of
  BundleEntryProto records, built here byte by byte (prefix-compressed keys, several data
  blocks, masked crc32c trailers), independently of engine.tf_checkpoint.
* :func:`reference_logits` is GPT-2's forward pass in float64 numpy straight from the
  HF-named tensors, independent of engine.model.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

HP = {"n_vocab": 50257, "n_ctx": 32, "n_embd": 32, "n_head": 4, "n_layer": 2}


def random_gpt2(hp: dict = HP, seed: int = 0) -> dict[str, np.ndarray]:
    """GPT-2 tensors with HF names (no prefix) and layouts, float32."""
    rng = np.random.default_rng(seed)
    V, T, C, L = hp["n_vocab"], hp["n_ctx"], hp["n_embd"], hp["n_layer"]

    def r(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"wte.weight": r(V, C), "wpe.weight": r(T, C), "ln_f.weight": 1 + r(C, scale=0.1), "ln_f.bias": r(C)}
    for i in range(L):
        p = f"h.{i}."
        t.update({
            p + "ln_1.weight": 1 + r(C, scale=0.1), p + "ln_1.bias": r(C),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C, scale=0.1), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
        })
    return t


def hf_config(hp: dict = HP) -> dict:
    return {
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
        "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": hp["n_ctx"], "n_embd": hp["n_embd"],
        "n_head": hp["n_head"], "n_layer": hp["n_layer"], "n_positions": hp["n_ctx"], "resid_pdrop": 0.1,
        "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": hp["n_vocab"],
    }


def write_hf(folder: Path, tensors: dict[str, np.ndarray], hp: dict = HP, fmt: str = "safetensors",
             prefix: str = "", lm_head: bool = False, mask_buffers: bool = False) -> Path:
    """A Hugging Face GPT-2 folder (``fmt``: safetensors, sharded, bin or bin-legacy).

    ``prefix="transformer."`` and ``lm_head`` mimic GPT2LMHeadModel's state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(hp), indent=2))
    sd = {prefix + k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    if mask_buffers:  # old checkpoints carry the causal-mask buffers
        T = hp["n_ctx"]
        for i in range(hp["n_layer"]):
            sd[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
            sd[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if lm_head:
        sd["lm_head.weight"] = torch.from_numpy(tensors["wte.weight"].copy())
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "sharded":  # model.safetensors.index.json + two shards, as large HF models are stored
        from safetensors.torch import save_file

        names = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in shards.items():
            save_file({k: sd[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:  # "bin", or "bin-legacy": torch's pre-zip format, as old uploads have it
        torch.save(sd, folder / "pytorch_model.bin", _use_new_zipfile_serialization=fmt != "bin-legacy")
    return folder


# ------------------------------------------------------------ TF bundle writer
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v)


def _field_bytes(num: int, b: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(b)) + b


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    c = _crc32c_bitwise(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int = 4) -> bytes:
    out = bytearray()
    restarts = []
    prev = b""
    for i, (k, v) in enumerate(entries):
        if i % restart_interval == 0:
            restarts.append(len(out))
            shared = 0
        else:
            shared = 0
            while shared < min(len(prev), len(k)) and prev[shared] == k[shared]:
                shared += 1
        out += _varint(shared) + _varint(len(k) - shared) + _varint(len(v)) + k[shared:] + v
        prev = k
    if not restarts:
        restarts = [0]
    for r in restarts:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts))
    return bytes(out)


def _bundle_entry(shape: tuple[int, ...], offset: int, size: int) -> bytes:
    dims = b"".join(_field_bytes(2, _field_varint(1, d)) for d in shape)
    msg = _field_varint(1, 1)  # DT_FLOAT
    msg += _field_bytes(2, dims)
    if offset:
        msg += _field_varint(4, offset)
    msg += _field_varint(5, size)
    msg += struct.pack("<B", 6 << 3 | 5) + struct.pack("<I", 0)  # the data's crc32c: not checked by the reader
    return msg


def write_tf_bundle(prefix: Path, tensors: dict[str, np.ndarray], block_bytes: int = 200) -> None:
    """A TensorFlow tensor bundle (index + one data shard) holding float32 ``tensors``."""
    data = bytearray()
    entries: list[tuple[bytes, bytes]] = []
    header = _field_varint(1, 1) + _field_bytes(3, _field_varint(1, 1))  # num_shards=1, version{producer=1}
    entries.append((b"", header))
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        entries.append((name.encode(), _bundle_entry(tensors[name].shape, len(data), len(raw))))
        data += raw
    (prefix.parent / (prefix.name + ".data-00000-of-00001")).write_bytes(bytes(data))

    out = bytearray()
    index_entries: list[tuple[bytes, bytes]] = []

    def emit(block: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(block))
        trailer = b"\x00"
        out.extend(block + trailer + struct.pack("<I", _masked(block + trailer)))
        return handle

    pending: list[tuple[bytes, bytes]] = []
    for k, v in entries:
        pending.append((k, v))
        if sum(len(a) + len(b) for a, b in pending) >= block_bytes:
            index_entries.append((pending[-1][0], emit(_block(pending))))
            pending = []
    if pending:
        index_entries.append((pending[-1][0], emit(_block(pending))))
    meta_handle = emit(_block([]))
    index_handle = emit(_block(index_entries, restart_interval=1))
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    out += footer
    (prefix.parent / (prefix.name + ".index")).write_bytes(bytes(out))


def hf_to_tf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OpenAI's names and layouts for HF-named tensors (Conv1D weights get a leading 1)."""
    out = {}
    for k, v in tensors.items():
        parts = k.split(".")
        leaf = {"weight": "w", "bias": "b"}[parts[-1]]
        if parts[0] in ("wte", "wpe"):
            out[f"model/{parts[0]}"] = v
            continue
        if parts[0] == "ln_f":
            out[f"model/ln_f/{'g' if leaf == 'w' else 'b'}"] = v
            continue
        i, rest = parts[1], parts[2:-1]
        if rest[0] in ("ln_1", "ln_2"):
            leaf = "g" if leaf == "w" else "b"
        conv = leaf == "w"
        out[f"model/h{i}/{'/'.join(rest)}/{leaf}"] = v[None] if conv else v
    return out


def write_tf(folder: Path, tensors: dict[str, np.ndarray], hp: dict = HP) -> Path:
    """OpenAI's GPT-2 folder layout for HF-named ``tensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hparams.json").write_text(json.dumps(hp))
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
    write_tf_bundle(folder / "model.ckpt", hf_to_tf_names(tensors))
    return folder


# ------------------------------------------------------------ reference model
def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu_new(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(t: dict[str, np.ndarray], hp: dict, ids: list[int]) -> np.ndarray:
    """GPT-2 (HF GPT2LMHeadModel semantics: Conv1D y = x W + b, tied head) in float64 numpy."""
    w = {k: v.astype(np.float64) for k, v in t.items()}
    T, C, H = len(ids), hp["n_embd"], hp["n_head"]
    d = C // H
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)
    for i in range(hp["n_layer"]):
        p = f"h.{i}."
        h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * C:(j + 1) * C].reshape(T, H, d).transpose(1, 0, 2) for j in range(3))
        att = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        att = np.where(causal, -np.inf, att)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        m = _gelu_new(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + m @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
    return x @ w["wte.weight"].T


def tiny_gpt2_checkpoint(out: Path, n_embd: int = 32, n_layer: int = 1, n_head: int = 2, context: int = 128,
                         seed: int = 0, tie: bool = True) -> Path:
    """A gpt-tui checkpoint of a small random GPT with GPT-2's vocabulary and tokenizer."""
    from engine.model import GPT, ModelConfig
    from engine.tokenizer import GPT2Tokenizer
    from engine.weights import write_weights

    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=50257, context_length=context, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=0.0, qkv_bias=True, tie_weights=tie))
    return Path(write_weights(str(out), model, GPT2Tokenizer().spec()))


def finetune_trainer(cfg, sink=None, **kw):
    """A trainer for instruction finetuning (what ``gpt-tui finetune`` builds)."""
    from engine.instruct import InstructTask
    from engine.trainer import Trainer

    return Trainer(cfg, sink, task=InstructTask(), **kw)
