"""The GPT model: shapes, presets, parameter counts, attention causality, KV cache."""

from __future__ import annotations

import pytest
import torch

from engine.errors import GptTuiError
from engine.model import GPT, PRESETS, KVCache, ModelConfig, preset_config


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 50, (3, 10))
    logits = m(x)
    assert logits.shape == (3, 10, 50)
    loss = m(x, x)
    assert loss.ndim == 0 and 3.0 < float(loss.detach()) < 5.0  # about ln(50) = 3.9 at init


def test_ignore_index_masks_targets():
    torch.manual_seed(0)
    m = GPT(tiny())
    x = torch.randint(0, 50, (1, 8))
    y = x.clone()
    y_masked = y.clone()
    y_masked[0, :4] = -100
    full = torch.nn.functional.cross_entropy(m(x)[0, 4:], y[0, 4:])
    assert torch.allclose(m(x, y_masked), full, atol=1e-6)


def test_causal_attention_future_does_not_leak():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 50, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 50
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_book_gpt2_parameter_count():
    # LLMs-from-scratch ch04: 163,009,536 parameters untied, 124,412,160 with the head tied.
    cfg = preset_config("gpt2", vocab_size=50257, qkv_bias=False)
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.num_params() == 163_009_536
    cfg_t = preset_config("gpt2", vocab_size=50257, tie_weights=True)
    with torch.device("meta"):
        mt = GPT(cfg_t)
    assert mt.num_params() == 124_412_160


def test_presets_match_the_books_sizes():
    assert (PRESETS["gpt2-medium"]["n_layer"], PRESETS["gpt2-medium"]["n_embd"]) == (24, 1024)
    assert (PRESETS["gpt2-large"]["n_layer"], PRESETS["gpt2-large"]["n_head"]) == (36, 20)
    assert (PRESETS["gpt2-xl"]["n_embd"], PRESETS["gpt2-xl"]["n_head"]) == (1600, 25)
    s = PRESETS["small"]
    assert (s["n_layer"], s["n_head"], s["n_embd"], s["context_length"]) == (6, 6, 384, 256)


def test_bigram_is_embedding_plus_head():
    m = GPT(preset_config("bigram", vocab_size=30))
    assert m.num_params() == 30 * 32 + 32 * 30
    x = torch.randint(0, 30, (2, 5))
    assert m(x).shape == (2, 5, 30)


def test_weight_tying_shares_the_matrix():
    m = GPT(tiny(tie_weights=True))
    assert m.head.weight.data_ptr() == m.tok_emb.weight.data_ptr()


def test_bad_configs_are_refused():
    with pytest.raises(GptTuiError, match="not divisible"):
        GPT(tiny(n_embd=30, n_head=4))
    with pytest.raises(GptTuiError, match="unknown preset"):
        preset_config("huge")


def test_flops_per_token_is_6n_plus_attention():
    m = GPT(tiny())
    n = m.num_params(non_embedding=True) - m.tok_emb.weight.numel()  # an untied lookup is no matmul
    assert m.flops_per_token(16) == 6 * n + 12 * 2 * 16 * 16


def test_weight_decay_only_on_matrices():
    m = GPT(tiny())
    opt = m.configure_optimizer(1e-3, 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


def test_weight_init_styles():
    cfg = tiny(vocab_size=2000, n_embd=64, context_length=512)
    torch.manual_seed(0)
    g = GPT(cfg)  # GPT-2 style: std 0.02, residual projections scaled down
    assert abs(float(g.tok_emb.weight.detach().std()) - 0.02) < 0.002
    assert abs(float(g.blocks[0].attn.qkv.weight.detach().std()) - 0.02) < 0.002
    assert float(g.blocks[0].attn.proj.weight.detach().std()) < 0.012  # 0.02 / sqrt(2 * 2)
    torch.manual_seed(0)
    t = GPT(cfg, weight_init="torch")  # the book's GPTModel: PyTorch's defaults
    assert abs(float(t.tok_emb.weight.detach().std()) - 1.0) < 0.05 and abs(float(t.pos_emb.weight.detach().std()) - 1.0) < 0.05
    bound = 1 / 64**0.5
    w = t.blocks[0].attn.qkv.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.std()) > 0.9 * bound / 3**0.5
    with pytest.raises(GptTuiError, match="weight init"):
        GPT(cfg, weight_init="xavier")


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.cfg, 2, 16)
        h = m.hidden(x[:, :5], cache)
        step_logits = [m.head(h)]
        for t in range(5, 9):
            step_logits.append(m.head(m.hidden(x[:, t : t + 1], cache)))
    got = torch.cat(step_logits, dim=1)
    assert torch.allclose(got, full, atol=1e-5)


def test_written_out_attention_equals_the_fused_kernel() -> None:
    """bf16 CPU training of short sequences takes causal_attention_math: same values and gradients."""
    import torch.nn.functional as F

    from engine.model import causal_attention_math

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, requires_grad=True) for _ in range(3))
    a = causal_attention_math(q, k, v)
    b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = causal_attention_math(q, k, v)
    torch.testing.assert_close(c.float(), b, rtol=0.05, atol=0.05)
