"""GPT-2 weights from disk (Hugging Face or OpenAI folders), mapped into :class:`engine.model.GPT`.

Two source formats, both a folder (nothing is downloaded):

* **Hugging Face** (``openai-community/gpt2`` and the medium/large/xl repos): ``config.json``
  plus ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) or
  ``pytorch_model.bin``. Names ``[transformer.]wte``, ``wpe``, ``h.N.ln_1``, ``h.N.attn.c_attn``,
  ``h.N.attn.c_proj``, ``h.N.ln_2``, ``h.N.mlp.c_fc``, ``h.N.mlp.c_proj``, ``ln_f`` (and a tied
  ``lm_head.weight``); ``Conv1D`` weights are stored (in, out) and are transposed here.
* **OpenAI's TensorFlow release** (``models/124M`` etc.): ``hparams.json`` plus
  ``model.ckpt.index``/``model.ckpt.data-00000-of-00001``, read by :mod:`engine.tf_checkpoint`
  (no TensorFlow needed). Names ``model/wte``, ``model/h0/attn/c_attn/w`` (shape [1, in, out]) ...

The architecture comes from the source: its context (1024 for GPT-2), width, depth and heads,
``qkv_bias`` on and the head tied to the token embedding. Every tensor's shape is checked and a
missing or unexpected tensor is an error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, GptTuiError
from .model import GPT, ModelConfig

# (n_layer, n_embd) -> the release's name
GPT2_SIZES = {(12, 768): "124M", (24, 1024): "355M", (36, 1280): "774M", (48, 1600): "1558M"}
GPT2_VOCAB = 50257
_HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old HF checkpoints


@dataclass
class GPT2Source:
    """A GPT-2 weights folder: its format, hyperparameters and tensor reader."""

    path: str
    format: str  # "hf" or "tf"
    hparams: dict[str, Any]  # n_vocab, n_ctx, n_embd, n_head, n_layer (+ dropout, tie)
    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], torch.Tensor]
    files: list[str]  # the weight files (hashed as the source's identity)

    @property
    def size_name(self) -> str:
        hp = self.hparams
        return GPT2_SIZES.get((hp["n_layer"], hp["n_embd"]), f"{hp['n_layer']}x{hp['n_embd']}")


# ------------------------------------------------------------------ detection
def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise GptTuiError(f"{path} is not valid JSON ({e})", "copy the model's files again") from None
    except OSError as e:
        raise GptTuiError(f"cannot read {path} ({e.strerror})", "check the folder's permissions") from None


def source_format(path: str) -> str | None:
    """``hf`` or ``tf`` when ``path`` is a GPT-2 weights folder, else None (e.g. a gpt-tui run)."""
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, "hparams.json")):
        return "tf"
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(d, dict) and ("n_embd" in d or d.get("model_type") == "gpt2" or "model_type" in d):
            return "hf"
    return None


def is_gpt2_source(path: str) -> bool:
    return source_format(path) is not None


def open_source(path: str) -> GPT2Source:
    """Open a GPT-2 folder (Hugging Face or OpenAI TensorFlow) for reading."""
    fmt = source_format(path)
    if fmt == "hf":
        return _open_hf(path)
    if fmt == "tf":
        return _open_tf(path)
    if not os.path.exists(path):
        raise GptTuiError(f"{path} does not exist", "give a GPT-2 folder (Hugging Face or OpenAI's models/124M)")
    raise GptTuiError(
        f"{path} is not a GPT-2 weights folder (no config.json or hparams.json)",
        "give a Hugging Face folder (config.json + model.safetensors) or OpenAI's folder (hparams.json + model.ckpt.*)",
    )


def _need_int(d: dict, keys: tuple[str, ...], where: str) -> int:
    for k in keys:
        v = d.get(k)
        if isinstance(v, int) and v > 0:
            return v
    raise GptTuiError(f"{where} has no positive integer {' / '.join(keys)}", "copy the model's original file again")


def _hf_hparams(cfg_path: str) -> dict[str, Any]:
    """GPT-2's hyperparameters from a Hugging Face config.json, refusing what gpt-tui's GPT cannot be."""
    c = _read_json(cfg_path)
    mt = c.get("model_type", "gpt2")
    if mt != "gpt2":
        raise GptTuiError(f"{cfg_path} describes a {mt!r} model, not GPT-2", "give the folder of a GPT-2 model")
    hp = {
        "n_vocab": _need_int(c, ("vocab_size",), cfg_path),
        "n_ctx": _need_int(c, ("n_positions", "n_ctx"), cfg_path),
        "n_embd": _need_int(c, ("n_embd",), cfg_path),
        "n_head": _need_int(c, ("n_head",), cfg_path),
        "n_layer": _need_int(c, ("n_layer",), cfg_path),
        "dropout": float(c.get("resid_pdrop", 0.1)),
        "tie": bool(c.get("tie_word_embeddings", True)),
    }
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise GptTuiError(f"{cfg_path} uses activation {act!r}; gpt-tui's GPT uses GPT-2's tanh GELU", "use a GPT-2 model")
    if c.get("n_inner") not in (None, 4 * hp["n_embd"]):
        raise GptTuiError(f"{cfg_path} has n_inner {c['n_inner']}, gpt-tui's MLP is 4 x n_embd", "use a GPT-2 model")
    if abs(float(c.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        raise GptTuiError(f"{cfg_path} has layer_norm_epsilon {c['layer_norm_epsilon']}, gpt-tui uses 1e-5",
                          "use a GPT-2 model")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(flag):
            raise GptTuiError(f"{cfg_path} sets {flag}, which gpt-tui's GPT does not have", "use a plain GPT-2 model")
    return hp


def _safetensors_reader(path: str, single: str, index: str) -> tuple[list[str], dict[str, tuple[int, ...]], Callable]:
    """(files, tensor shapes, get) of a model.safetensors or a sharded one's index."""
    from safetensors import safe_open

    if os.path.isfile(single):
        files = [single]
    else:
        wm = _read_json(index).get("weight_map", {})
        files = [os.path.join(path, f) for f in sorted(set(wm.values()))]
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Any] = {}
    for f in files:
        if not os.path.isfile(f):
            raise GptTuiError(f"{f} is missing", "copy all of the model's files into the folder")
        try:
            h = safe_open(f, framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})", "copy it again") from None
        for k in h.keys():
            shapes[k] = tuple(h.get_slice(k).get_shape())
            where[k] = h
    return files, shapes, lambda name: where[name].get_tensor(name)


def _torch_bin_reader(pt: str) -> tuple[list[str], dict[str, tuple[int, ...]], Callable]:
    """(files, tensor shapes, get) of a legacy pytorch_model.bin, loaded safely (weights only)."""
    try:
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{pt} could not be read safely ({str(e).splitlines()[0][:160]})",
                              "use the model's model.safetensors instead") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{pt} does not hold a state dict", "use the model's model.safetensors instead")
    return [pt], {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}, sd.__getitem__


def _open_hf(path: str) -> GPT2Source:
    hp = _hf_hparams(os.path.join(path, "config.json"))
    st = os.path.join(path, "model.safetensors")
    st_index = os.path.join(path, "model.safetensors.index.json")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st) or os.path.isfile(st_index):
        files, shapes, get = _safetensors_reader(path, st, st_index)
    elif os.path.isfile(pt):
        files, shapes, get = _torch_bin_reader(pt)
    else:
        raise GptTuiError(f"{path} has config.json but no model.safetensors or pytorch_model.bin",
                          "copy the weights file into the folder (see the README, Start from GPT-2)")
    return GPT2Source(path=path, format="hf", hparams=hp, shapes=shapes, get=get, files=files)


def _open_tf(path: str) -> GPT2Source:
    from .tf_checkpoint import TFCheckpoint, checkpoint_prefix

    hp_path = os.path.join(path, "hparams.json")
    h = _read_json(hp_path)
    hp = {
        "n_vocab": _need_int(h, ("n_vocab",), hp_path),
        "n_ctx": _need_int(h, ("n_ctx",), hp_path),
        "n_embd": _need_int(h, ("n_embd",), hp_path),
        "n_head": _need_int(h, ("n_head",), hp_path),
        "n_layer": _need_int(h, ("n_layer",), hp_path),
        "dropout": 0.1,  # GPT-2's training value; hparams.json does not record it
        "tie": True,
    }
    ckpt = TFCheckpoint(checkpoint_prefix(path))
    return GPT2Source(path=path, format="tf", hparams=hp, shapes=ckpt.shapes(), get=ckpt.get,
                      files=[ckpt.prefix + ".index", *ckpt.data_files()])


# ------------------------------------------------------------------- mapping
@dataclass
class _Spec:
    source: str
    shape: tuple[int, ...]
    target: str
    transform: str  # "" (as is), "t" (transpose), "squeeze_t" (drop the leading 1, transpose)


def tensor_specs(fmt: str, hp: dict[str, Any]) -> list[_Spec]:
    """Every tensor a GPT-2 source must hold: name, shape, our name, layout change."""
    V, T, C, L = hp["n_vocab"], hp["n_ctx"], hp["n_embd"], hp["n_layer"]
    # (hf suffix, tf suffix, shape as HF stores it, our name, is a Conv1D weight)
    layer = [
        ("ln_1.weight", "ln_1/g", (C,), "ln1.weight", False),
        ("ln_1.bias", "ln_1/b", (C,), "ln1.bias", False),
        ("attn.c_attn.weight", "attn/c_attn/w", (C, 3 * C), "attn.qkv.weight", True),
        ("attn.c_attn.bias", "attn/c_attn/b", (3 * C,), "attn.qkv.bias", False),
        ("attn.c_proj.weight", "attn/c_proj/w", (C, C), "attn.proj.weight", True),
        ("attn.c_proj.bias", "attn/c_proj/b", (C,), "attn.proj.bias", False),
        ("ln_2.weight", "ln_2/g", (C,), "ln2.weight", False),
        ("ln_2.bias", "ln_2/b", (C,), "ln2.bias", False),
        ("mlp.c_fc.weight", "mlp/c_fc/w", (C, 4 * C), "mlp.fc.weight", True),
        ("mlp.c_fc.bias", "mlp/c_fc/b", (4 * C,), "mlp.fc.bias", False),
        ("mlp.c_proj.weight", "mlp/c_proj/w", (4 * C, C), "mlp.proj.weight", True),
        ("mlp.c_proj.bias", "mlp/c_proj/b", (C,), "mlp.proj.bias", False),
    ]
    top = [
        ("wte.weight", "model/wte", (V, C), "tok_emb.weight"),
        ("wpe.weight", "model/wpe", (T, C), "pos_emb.weight"),
        ("ln_f.weight", "model/ln_f/g", (C,), "ln_f.weight"),
        ("ln_f.bias", "model/ln_f/b", (C,), "ln_f.bias"),
    ]
    tf = fmt == "tf"
    specs = [_Spec(t if tf else h, shape, ours, "") for h, t, shape, ours in top]
    for i in range(L):
        for h, t, shape, ours, conv in layer:
            if tf:
                specs.append(_Spec(f"model/h{i}/{t}", (1, *shape) if conv else shape, f"blocks.{i}.{ours}",
                                   "squeeze_t" if conv else ""))
            else:
                specs.append(_Spec(f"h.{i}.{h}", shape, f"blocks.{i}.{ours}", "t" if conv else ""))
    return specs


def _transform(t: torch.Tensor, how: str) -> torch.Tensor:
    t = t.to(torch.float32)
    if how == "t":
        return t.t().contiguous()
    if how == "squeeze_t":
        return t[0].t().contiguous()
    return t.contiguous()


def _hf_name(name: str) -> str:
    return name[len("transformer."):] if name.startswith("transformer.") else name


def build_from_source(src: GPT2Source, dropout: float | None = None) -> GPT:
    """A GPT holding the source's weights (each tensor checked for presence and shape)."""
    hp = src.hparams
    if hp["n_embd"] % hp["n_head"]:
        raise GptTuiError(f"{src.path}: n_embd {hp['n_embd']} is not divisible by n_head {hp['n_head']}",
                          "the hyperparameter file is damaged; copy it again")
    # HF names may carry the GPT2LMHeadModel prefix "transformer."
    names = {(_hf_name(n) if src.format == "hf" else n): n for n in src.shapes}
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for spec in tensor_specs(src.format, hp):
        if spec.source not in names:
            raise CheckpointError(f"tensor {spec.source} is missing from {src.path}",
                                  "the weights are incomplete or not GPT-2's; copy them again")
        real = names[spec.source]
        shape = tuple(src.shapes[real])
        if shape != spec.shape:
            raise CheckpointError(
                f"tensor {spec.source} in {src.path} has shape {list(shape)}, expected {list(spec.shape)} "
                f"from the hyperparameters", "the weights do not match their config; copy both again",
            )
        state[spec.target] = _transform(src.get(real), spec.transform)
        seen.add(spec.source)
    tie = hp["tie"]
    head_name = next((names[n] for n in ("lm_head.weight",) if n in names), None)
    if head_name is not None:
        seen.add("lm_head.weight")
        if tuple(src.shapes[head_name]) != (hp["n_vocab"], hp["n_embd"]):
            raise CheckpointError(f"tensor lm_head.weight in {src.path} has shape {list(src.shapes[head_name])}, "
                                  f"expected {[hp['n_vocab'], hp['n_embd']]}", "copy the weights again")
        head = _transform(src.get(head_name), "")
        if not tie or not torch.equal(head, state["tok_emb.weight"]):
            tie = False
            state["head.weight"] = head
    unexpected = sorted(n for n in names if n not in seen and not (src.format == "hf" and n.endswith(_HF_BUFFERS)))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise CheckpointError(f"unexpected tensor {', '.join(unexpected[:3])}{more} in {src.path}",
                              "this is not a plain GPT-2 checkpoint; give GPT-2's own files")
    if not tie and "head.weight" not in state:
        raise CheckpointError(f"tensor lm_head.weight is missing from {src.path} (its config unties the head)",
                              "copy the weights again")
    mcfg = ModelConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], n_layer=hp["n_layer"],
                       n_head=hp["n_head"], n_embd=hp["n_embd"], dropout=hp["dropout"] if dropout is None else dropout,
                       qkv_bias=True, tie_weights=tie, arch="gpt")
    return gpt_from_state(mcfg, state)


def gpt_from_state(mcfg: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
    """Build a GPT around ``state`` without a random init (the tensors are used as they are)."""
    with torch.device("meta"):
        model = GPT(mcfg)
    if mcfg.tie_weights:
        state = {k: v for k, v in state.items() if k != "head.weight"}
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, assign=True)
    if mcfg.tie_weights:
        model.head.weight = model.tok_emb.weight  # assign=True made two parameters; tie them again
    return model


def load_gpt2(path: str, dropout: float | None = None) -> tuple[GPT, GPT2Source]:
    """Read a GPT-2 folder into a GPT; returns the model and the opened source."""
    src = open_source(path)
    return build_from_source(src, dropout), src
