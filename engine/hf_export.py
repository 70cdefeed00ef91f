"""Export a gpt-tui checkpoint as a Hugging Face GPT-2 folder (``gpt-tui export --format hf``).

The folder is what ``transformers.GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read, written without transformers or tokenizers installed:

* ``model.safetensors``: GPT2LMHeadModel's names (``transformer.wte.weight``, ``transformer.h.N.attn.c_attn.weight``,
  ..., ``lm_head.weight`` only when the head is untied), float32. GPT-2's ``Conv1D`` layers store their
  weight as (in, out), the transpose of our ``nn.Linear`` (out, in). A model without a query/key/value bias
  gets zeros there, which computes the same function.
* ``config.json`` and ``generation_config.json``.
* The tokenizer. GPT-2 BPE: ``vocab.json`` and ``merges.txt`` (the packaged ``encoder.json`` and
  ``vocab.bpe``, unchanged), ``tokenizer.json`` (the same BPE for the ``tokenizers`` library),
  ``tokenizer_config.json`` and ``special_tokens_map.json``. Char level: a ``tokenizer.json`` that splits
  text into single characters (code points) and maps each to our id with a word-level vocabulary, so
  ``PreTrainedTokenizerFast`` encodes and decodes exactly as :class:`engine.tokenizer.CharTokenizer`; a
  character outside the vocabulary is an error there as here.

LoRA checkpoints are exported merged. What GPT-2's layout cannot express is refused with one line: the
``bigram`` baseline (no position embedding, blocks or final LayerNorm), a model setting GPT-2's config has
no field for, a tensor with no place among GPT-2's, a LayerNorm epsilon other than 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import checkpoint as ck
from .errors import GptTuiError
from .model import GPT, ModelConfig
from .tokenizer import (
    EOT_TEXT,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    gpt2_vocab_files,
    tokenizer_from_spec,
)

WEIGHTS = "model.safetensors"
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json")
CHAR_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAR_UNKNOWN = "<unk>"
"""WordLevel's ``unk_token``: absent from the vocabulary, so an unknown character is an error, as ours is."""
LAYER_NORM_EPS = 1e-5

# our block tensor -> (GPT-2's name under transformer.h.N., is a Conv1D weight)
_BLOCK = {
    "ln1.weight": ("ln_1.weight", False), "ln1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln2.weight": ("ln_2.weight", False), "ln2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
        "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias"}


@dataclass
class HFExport:
    """What :func:`export_hf` wrote."""

    out: str
    files: list[str]
    n_params: int
    tokenizer: str  # "gpt2" or "char"
    merged_lora: bool = False
    config: dict[str, Any] = field(default_factory=dict)


def _refuse(what: str) -> GptTuiError:
    return GptTuiError(f"{what} cannot be expressed in GPT-2's layout (Hugging Face GPT2LMHeadModel)",
                       "export it with --format gpt-tui instead")


# ------------------------------------------------------------------ weights
def check_config(cfg: ModelConfig) -> None:
    """Raise a one-line error when GPT-2's config cannot describe ``cfg``."""
    if cfg.arch != "gpt":
        what = ("the bigram baseline (a token embedding and a linear head: no position embedding, no "
                "transformer blocks, no final LayerNorm)") if cfg.arch == "bigram" else f"architecture {cfg.arch!r}"
        raise _refuse(what)
    # Every setting must be one GPT-2's config carries; qkv_bias=False is written as zero biases.
    expressed = {"vocab_size", "context_length", "n_layer", "n_head", "n_embd", "dropout", "qkv_bias", "tie_weights",
                 "arch"}
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for name, value in cfg.to_dict().items():
        if name not in expressed and value != defaults.get(name, value):
            raise _refuse(f"model setting {name}={value!r}")


def check_expressible(model: GPT) -> None:
    """Raise a one-line error when GPT-2's architecture cannot hold ``model``."""
    check_config(model.cfg)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and (abs(m.eps - LAYER_NORM_EPS) > 1e-12 or not m.elementwise_affine):
            raise _refuse(f"LayerNorm {name} (eps {m.eps}, affine {m.elementwise_affine}; GPT-2's is eps 1e-5 with "
                          "weight and bias)")


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (float32, contiguous) holding ``model``'s weights."""
    check_expressible(model)
    cfg = model.cfg
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, name in _TOP.items():
        out[name] = ours[k].contiguous()
        used.add(k)
    C = cfg.n_embd
    for i in range(cfg.n_layer):
        for k, (name, conv) in _BLOCK.items():
            key = f"blocks.{i}.{k}"
            if key in ours:
                t = ours[key]
                used.add(key)
            elif k == "attn.qkv.bias":  # --no-qkv-bias: a zero bias is the same function
                t = torch.zeros(3 * C)
            else:
                raise _refuse(f"a block without {key}")
            out[f"transformer.h.{i}.{name}"] = t.t().contiguous() if conv else t.contiguous()
    used.add("head.weight")
    if not cfg.tie_weights:
        out["lm_head.weight"] = ours["head.weight"].clone()
    elif not torch.equal(ours["head.weight"], ours["tok_emb.weight"]):
        raise GptTuiError("the model says its head is tied to the token embedding, but the two differ",
                          "the checkpoint is damaged; use another one")
    extra = sorted(set(ours) - used)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise _refuse(f"tensor {', '.join(extra[:3])}{more}")
    return out


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """GPT-2's ``config.json`` for a model of ``cfg`` with ``tokenizer``'s special ids."""
    eot = tokenizer.eot_id
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # GPT-2's tanh GELU, as F.gelu(approximate="tanh")
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_weights,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
        "torch_dtype": "float32",
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "summary_activation": None,
        "summary_proj_to_labels": True,
        "summary_first_dropout": 0.1,
    }


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    eot = tokenizer.eot_id
    return {"bos_token_id": eot, "eos_token_id": eot}


# ---------------------------------------------------------------- tokenizers
def gpt2_tokenizer_json() -> dict[str, Any]:
    """GPT-2's byte-level BPE as a ``tokenizers`` ``tokenizer.json``, from the packaged vocabulary files."""
    vocab_bpe, encoder_json = gpt2_vocab_files()
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [line for line in f.read().split("\n")[1:] if line]  # the first line is "#version: 0.2"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": GPT2Tokenizer.eot_id, "content": EOT_TEXT, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": True, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": merges},
    }


def char_tokenizer_json(tok: CharTokenizer) -> dict[str, Any]:
    """A ``tokenizer.json`` that encodes and decodes as ``tok``: one token per character (code point)."""
    for c in tok.chars:
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise GptTuiError(f"the char vocabulary holds {c!r}, which is not a Unicode character (a lone surrogate) "
                              "and cannot be written to tokenizer.json", "export with --format gpt-tui") from None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        # every character its own piece ([\s\S]: any code point, newlines included)
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},  # concatenate the pieces, no spaces between them
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)}, "unk_token": CHAR_UNKNOWN},
    }


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def _copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_tokenizer(out: str, tokenizer: Tokenizer, context_length: int) -> list[str]:
    """Write ``tokenizer``'s Hugging Face files into ``out``; returns their names."""
    common = {"model_max_length": context_length, "clean_up_tokenization_spaces": False}
    if isinstance(tokenizer, GPT2Tokenizer):
        vocab_bpe, encoder_json = gpt2_vocab_files()
        _copy(encoder_json, os.path.join(out, "vocab.json"))
        _copy(vocab_bpe, os.path.join(out, "merges.txt"))
        _write_json(os.path.join(out, "tokenizer.json"), gpt2_tokenizer_json())
        special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
        _write_json(os.path.join(out, "tokenizer_config.json"),
                    {"tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False, "add_bos_token": False,
                     "errors": "replace", **common})
        _write_json(os.path.join(out, "special_tokens_map.json"), special)
        return list(GPT2_TOKENIZER_FILES)
    if isinstance(tokenizer, CharTokenizer):
        _write_json(os.path.join(out, "tokenizer.json"), char_tokenizer_json(tokenizer))
        _write_json(os.path.join(out, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast", **common})
        _write_json(os.path.join(out, "special_tokens_map.json"), {})
        return list(CHAR_TOKENIZER_FILES)
    raise GptTuiError(f"tokenizer {tokenizer.name!r} has no Hugging Face form", "export it with --format gpt-tui")


# ------------------------------------------------------------------- export
def _prepare_out(out: str, names: list[str]) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise GptTuiError(f"{out} is a file; --format hf writes a folder", "give a new or empty folder to --out")
    if os.path.isdir(out):
        others = sorted(n for n in os.listdir(out) if n not in names)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise GptTuiError(f"{out} already holds other files ({shown})",
                              "give a new or empty folder to --out (a Hugging Face loader would read them too)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise GptTuiError(f"cannot create {out} ({e.strerror})", "give a folder you can write to") from None


def export_model(model: GPT, tokenizer: Tokenizer, out: str) -> HFExport:
    """Write ``model`` and ``tokenizer`` as a Hugging Face GPT-2 folder ``out``."""
    from safetensors.torch import save_file

    model = model.eval()
    state = hf_state_dict(model)  # refuses what GPT-2 cannot express before anything is written
    if isinstance(tokenizer, CharTokenizer):
        char_tokenizer_json(tokenizer)  # refuses a vocabulary tokenizer.json cannot hold, before writing
    elif not isinstance(tokenizer, GPT2Tokenizer):
        raise GptTuiError(f"tokenizer {tokenizer.name!r} has no Hugging Face form", "export it with --format gpt-tui")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise GptTuiError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.cfg.vocab_size}",
                          "the checkpoint is damaged; use another one")
    tok_files = list(GPT2_TOKENIZER_FILES if isinstance(tokenizer, GPT2Tokenizer) else CHAR_TOKENIZER_FILES)
    names = [WEIGHTS, "config.json", "generation_config.json", *tok_files]
    _prepare_out(out, names)
    config = hf_config(model.cfg, tokenizer)
    _write_json(os.path.join(out, "config.json"), config)
    tmp = os.path.join(out, f"{WEIGHTS}.tmp{os.getpid()}")
    save_file(state, tmp, metadata={"format": "pt"})
    shutil.copymode(os.path.join(out, "config.json"), tmp)  # safetensors creates 0600; the umask's mode as the rest
    os.replace(tmp, os.path.join(out, WEIGHTS))
    _write_json(os.path.join(out, "generation_config.json"), generation_config(tokenizer))
    write_tokenizer(out, tokenizer, model.cfg.context_length)
    return HFExport(out=out, files=names, n_params=model.num_params(), tokenizer=tokenizer.name, config=config)


def export_hf(source: str, out: str) -> HFExport:
    """Export a gpt-tui run or checkpoint (LoRA adapters merged) as a Hugging Face GPT-2 folder."""
    from .weights import model_from_checkpoint

    ckpt = ck.load_checkpoint(source)
    tokenizer = tokenizer_from_spec(ckpt.tokenizer)
    check_config(ModelConfig.from_dict(ckpt.model_config))  # before building (a LoRA run loads its base)
    model = model_from_checkpoint(ckpt)
    result = export_model(model, tokenizer, out)
    result.merged_lora = ckpt.kind == "lora"
    return result
