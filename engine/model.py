"""GPT-2 style model: one explicit file.

Token + position embeddings, pre-LayerNorm transformer blocks with causal self-attention
through ``F.scaled_dot_product_attention``, a GELU MLP, a final LayerNorm and an LM head
(optionally tied to the token embedding). Also the ``bigram`` baseline (embedding + linear
head). Generation with a KV cache lives in :mod:`engine.sampling`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import GptTuiError
from .model_config import PRESETS, WEIGHT_INITS, ModelConfig, preset_config

__all__ = ["GPT", "KVCache", "ModelConfig", "PRESETS", "WEIGHT_INITS", "preset_config", "linear_cross_entropy"]


MATH_ATTENTION_MAX_T = 128
"""Longest sequence for which bf16 CPU training uses :func:`causal_attention_math` (beyond it the
fused kernel's memory-light backward wins, and the written-out one keeps T x T weights per head)."""


def causal_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention written out: ``softmax(q k^T / sqrt(d) + mask) v``.

    Under bf16 autocast on a CPU, for short sequences, this runs several times faster (forward and
    backward) than PyTorch's fused CPU attention kernel, whose bf16 backward is slow for small
    heads (in fp32 the fused kernel is the faster one, and on GPUs it always is).
    """
    T, S = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, dropout_p)
    return att @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.attn_mask(T, k.size(2), x.device))
        elif T <= MATH_ATTENTION_MAX_T and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
                torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling():
            y = causal_attention_math(q, k, v, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache, layer)
        return x + self.mlp(self.ln2(x))


class KVCache:
    """Preallocated key/value cache for all layers of one generation.

    ``pad`` (B,) counts left-padding tokens per row, for a batch of prompts of different
    lengths: padded keys are masked out and positions start at 0 at each row's first real
    token (see :func:`engine.sampling.generate_batch`).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, pad: torch.Tensor | None = None) -> None:
        hd = cfg.n_embd // cfg.n_head
        self.shape = (cfg.n_layer, batch, cfg.n_head, max_len, hd)
        self.k: torch.Tensor | None = None  # allocated at first use, in the dtype of the keys
        self.v: torch.Tensor | None = None
        self.pos = 0  # tokens already stored (same for every layer after a full forward)
        self._pending = 0
        self.max_len = max_len
        self.pad = pad if pad is not None and bool((pad > 0).any()) else None
        self._mask: tuple[tuple[int, int], torch.Tensor | None] | None = None

    def attn_mask(self, T: int, Tk: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask (True: attend) for ``T`` new queries over ``Tk`` cached keys; None: all."""
        if self._mask is not None and self._mask[0] == (T, Tk):
            return self._mask[1]
        mask = None
        if T > 1:  # query i sees keys up to (Tk - T + i)
            mask = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - T)
        if self.pad is not None:
            keys = torch.arange(Tk, device=device)
            real = (keys[None, :] >= self.pad[:, None].to(device))[:, None, None, :]  # (B, 1, 1, Tk)
            own = keys[None, :] == torch.arange(Tk - T, Tk, device=device)[:, None]  # (T, Tk)
            # a padding query keeps its own key, so no softmax row is empty (NaN)
            mask = ((mask if mask is not None else True) & real) | own
        self._mask = ((T, Tk), mask)
        return mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k = torch.empty(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.empty(self.shape, device=v.device, dtype=v.dtype)
        T = k.size(2)
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        self._pending = T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self) -> None:
        self.pos += self._pending
        self._pending = 0


class GPT(nn.Module):
    """GPT-2 architecture (or the bigram baseline when ``cfg.arch == 'bigram'``).

    ``weight_init="gpt2"`` draws weights as GPT-2 and nanoGPT do (std 0.02, residual projections
    scaled by 1/sqrt(2 * n_layer)); ``"torch"`` keeps PyTorch's layer defaults, as the book's
    ``GPTModel`` does (N(0, 1) embeddings, uniform linear weights).
    """

    def __init__(self, cfg: ModelConfig, weight_init: str = "gpt2") -> None:
        super().__init__()
        cfg.validate()
        if weight_init not in WEIGHT_INITS:
            raise GptTuiError(f"unknown weight init {weight_init!r}", f"choose {' or '.join(WEIGHT_INITS)}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "bigram":
            self.pos_emb = None
            self.drop = nn.Identity()
            self.blocks = nn.ModuleList()
            self.ln_f = nn.Identity()
        else:
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        if weight_init == "torch":
            return  # PyTorch's layer defaults, as the book's GPTModel (embeddings N(0, 1))
        self.apply(self._init_weights)
        # GPT-2 scaled init of residual projections.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * max(1, cfg.n_layer)))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    # ----------------------------------------------------------------- forward
    def hidden(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states (after the last LayerNorm), shape (B, T, C)."""
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if self.pos_emb is not None and start + T > self.cfg.context_length:
            raise GptTuiError(
                f"sequence of {start + T} tokens is longer than the context {self.cfg.context_length}",
                "shorten the input",
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            pos = torch.arange(start, start + T, device=idx.device)
            if kv_cache is not None and kv_cache.pad is not None:  # left-padded rows count from 0
                pos = (pos[None, :] - kv_cache.pad[:, None].to(idx.device)).clamp(min=0)
            x = x + self.pos_emb(pos)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance()
        return self.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, V) when ``targets`` is None, else the mean cross-entropy loss.

        Targets of -100 are ignored (padding and masked prompt tokens).
        """
        h = self.hidden(idx, kv_cache)
        if targets is None:
            return self.head(h)
        return self.loss_from_hidden(h, targets)

    def loss_from_hidden(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the LM head's logits; targets of -100 are ignored.

        A plain ``nn.Linear`` head goes through :func:`linear_cross_entropy` (chunked, no full
        fp32 logits kept); any other head (e.g. one wrapped for LoRA) and compiled graphs take
        the reference path.
        """
        if type(self.head) is nn.Linear and self.head.bias is None and not torch.compiler.is_compiling():
            return linear_cross_entropy(h, self.head.weight, targets)
        logits = self.head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    # ------------------------------------------------------------------ facts
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in nanoGPT / PaLM appendix B."""
        cfg = self.cfg
        T = seq_len or cfg.context_length
        N = self.num_params(non_embedding=True)
        if not cfg.tie_weights:
            N -= self.tok_emb.weight.numel()  # a lookup, no matmul (a tied table is the head's)
        if cfg.arch == "bigram":
            return 6.0 * cfg.n_embd * cfg.vocab_size
        return 6.0 * N + 12.0 * cfg.n_layer * cfg.n_embd * T

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), fused: bool | None = None
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (embeddings and linear weights)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        kwargs = {}
        if fused is None:
            dev = next(self.parameters()).device.type
            fused = dev in ("cuda", "cpu")
        if fused:
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)


LOSS_CHUNK_ELEMENTS = 1 << 23
"""Logits computed at a time by :func:`linear_cross_entropy` (32 MB of fp32)."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ w.T`` whose gradients are computed in the forward pass.

    The logits are made ``chunk`` rows at a time: each chunk's fp32 log-softmax gives the
    loss, and its softmax is written straight into one gradient buffer ``G`` in the
    compute dtype (bf16 under autocast). The reference path instead keeps the logits, an
    fp32 copy, the log-softmax and their gradients, about six full passes over
    (rows x vocab) memory that dominate small models with a 50,257-token head.
    """

    @staticmethod
    def forward(ctx, h, w, targets, chunk, cdt):  # noqa: ANN001, ANN205
        with torch.autocast(h.device.type, enabled=False):
            n = h.size(0)
            hc, wc = h.to(cdt), w.to(cdt)
            valid = targets != -100
            n_valid = valid.sum().clamp(min=1)
            tgt = targets.clamp(min=0)
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            g = torch.empty(n, w.size(0), dtype=cdt, device=h.device) if need_h or need_w else None
            nll = torch.empty(n, dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                logp = torch.log_softmax((hc[s:e] @ wc.t()).float(), dim=-1)
                nll[s:e] = logp.gather(1, tgt[s:e, None]).squeeze(1).neg()
                if g is not None:
                    torch.exp(logp, out=g[s:e])  # softmax
            loss = (nll * valid).sum() / n_valid
            grad_h = grad_w = None
            if g is not None:
                g[torch.arange(n, device=h.device), tgt] -= 1  # softmax - one_hot
                scale = valid.to(torch.float32) / n_valid  # ignored rows get no gradient
                if need_h:
                    grad_h = (g @ wc).float().mul_(scale[:, None]).to(h.dtype)
                if need_w:
                    grad_w = (g.t() @ (hc * valid[:, None].to(cdt))).float().div_(n_valid).to(w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None,
            None, None, None,
        )


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` against ``targets`` (-100 ignored), like
    ``F.cross_entropy(F.linear(h, weight).float(), targets)`` but without materializing the
    full logits or their fp32 copies. Matmuls run in the autocast dtype when autocast is on;
    softmax and loss are fp32. ``h`` is (..., C), ``targets`` the matching (...) ids.
    """
    h2 = h.reshape(-1, h.size(-1))
    t = targets.reshape(-1)
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    chunk = chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
    if not torch.is_grad_enabled():
        with torch.no_grad():
            return _LinearCrossEntropy.forward(_NoGradCtx, h2, weight, t, chunk, cdt)
    return _LinearCrossEntropy.apply(h2, weight, t, chunk, cdt)


class _NoGradCtx:
    """Stand-in autograd context for loss-only evaluation (no gradient buffers)."""

    needs_input_grad = (False, False, False, False, False)

    @staticmethod
    def save_for_backward(*tensors: torch.Tensor | None) -> None:
        pass


def describe_shape_mismatch(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    own: dict[str, torch.Tensor] | None = None,
    what: str = "",
    limit: int = 5,
) -> list[str]:
    """Human-readable differences between a model's parameters and a state dict.

    ``own`` narrows the comparison to some of the model's tensors (LoRA adapters), and ``what``
    names them in the missing/unexpected lines.
    """
    own = model.state_dict() if own is None else own
    out = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    for label, keys in ((f"missing{what}", missing), (f"unexpected{what}", unexpected)):
        if keys:
            out.append(f"{label}: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}")
    return out
