"""Generation: KV cache against full recomputation, seeds, top-k/top-p, batches of prompts."""

from __future__ import annotations

import pytest
import torch

from engine.errors import GptTuiError
from engine.model import GPT, ModelConfig
from engine.sampling import (
    TRANSPOSED_HEAD_MIN_TOKENS,
    SampleSettings,
    filter_logits,
    generate,
    generate_batch,
    generate_text_simple,
    next_logits_fn,
)

CTX = 16


@pytest.fixture(scope="module")
def model() -> GPT:
    """A tiny random GPT with weights scaled up so its next-token choices are far from ties."""
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=50, context_length=CTX, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)
    return m.eval()


def greedy(n: int, use_cache: bool = True) -> SampleSettings:
    return SampleSettings(max_new_tokens=n, temperature=0.0, use_cache=use_cache)


@pytest.mark.parametrize("prompt_len,new", [(5, 8), (5, 30), (CTX, 10), (CTX + 7, 12), (5, 40)])
def test_cached_and_uncached_greedy_agree(model: GPT, prompt_len: int, new: int) -> None:
    # (5, 30), (5, 40) and the long prompts run past the context, where the window slides;
    # 40 tokens are enough for the transposed copy of the head on CPU.
    torch.manual_seed(1)
    x = torch.randint(0, 50, (2, prompt_len))
    cached = generate(model, x, greedy(new))
    uncached = generate(model, x, greedy(new, use_cache=False))
    book = generate_text_simple(model, x, new, CTX)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, book)
    # the text is not degenerate (a constant output would agree trivially)
    assert len(set(cached[0, prompt_len:].tolist())) > 2


def test_transposed_head_gives_the_module_head_logits(model: GPT) -> None:
    h = torch.randn(3, model.cfg.n_embd)
    short = next_logits_fn(model, 1)
    long = next_logits_fn(model, TRANSPOSED_HEAD_MIN_TOKENS)
    assert short is model.head and long is not model.head
    with torch.no_grad():
        assert torch.allclose(long(h), model.head(h), rtol=1e-5, atol=1e-4)


def test_same_seed_same_output_and_global_rng_untouched(model: GPT) -> None:
    x = torch.randint(0, 50, (1, 4))
    s = SampleSettings(max_new_tokens=25, temperature=1.0, top_k=None, seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, x, s)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, x, s)
    c = generate(model, x, SampleSettings(max_new_tokens=25, temperature=1.0, top_k=None, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the seed fixes the uncached path too, and it draws the same tokens
    d = generate(model, x, SampleSettings(max_new_tokens=25, temperature=1.0, top_k=None, seed=7, use_cache=False))
    assert torch.equal(a, d)


def test_top_k_keeps_k_tokens() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.5, -1.0]])
    probs = filter_logits(logits, 1.0, 2, None)
    assert (probs > 0).sum() == 2
    assert probs[0, 0] > probs[0, 2] > 0 and probs[0, 1] == 0
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = p.log()
    kept = filter_logits(logits, 1.0, None, 0.7) > 0
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    kept = filter_logits(logits, 1.0, None, 0.5) > 0
    assert kept.tolist() == [[True, False, False, False]]
    assert (filter_logits(logits, 1.0, None, 1.0) > 0).all()  # 1.0 turns it off


def test_temperature_zero_is_argmax_and_low_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    assert filter_logits(logits, 0.0, None, None).tolist() == [[0.0, 1.0, 0.0]]
    cold = filter_logits(logits, 0.5, None, None)[0, 1]
    warm = filter_logits(logits, 2.0, None, None)[0, 1]
    assert cold > warm


def test_sampling_respects_top_k(model: GPT) -> None:
    x = torch.randint(0, 50, (1, 3))
    with torch.no_grad():
        allowed = set(torch.topk(model(x)[0, -1], 2).indices.tolist())
    seen = {int(generate(model, x, SampleSettings(max_new_tokens=1, temperature=5.0, top_k=2, seed=s))[0, -1])
            for s in range(30)}
    assert seen == allowed  # both kept tokens drawn, nothing else


@pytest.mark.parametrize("new", [6, 25])  # 25 runs past the context for the longest prompt
def test_batch_of_different_lengths_matches_one_by_one(model: GPT, new: int) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7], list(range(20, 20 + CTX + 3))]
    batch = generate_batch(model, prompts, greedy(new))
    for p, got in zip(prompts, batch, strict=True):
        alone = generate(model, torch.tensor([p]), greedy(new))[0, len(p):].tolist()
        assert got == alone
    # padding really matters: the rows are not all the same continuation
    assert len({tuple(r) for r in batch}) == len(prompts)


def test_batch_rows_stop_at_their_own_end_of_text(model: GPT) -> None:
    prompts = [[1, 2], [3, 4, 5, 6]]
    full = generate_batch(model, prompts, greedy(12))
    # call "end of text" the first token of row 0 that is new after its first token
    k = next(i for i in range(1, len(full[0])) if full[0][i] not in full[0][:i])
    eot = full[0][k]
    stopped = generate_batch(model, prompts, greedy(12), eot_id=eot)
    assert stopped[0] == full[0][:k]
    row1 = full[1][: full[1].index(eot)] if eot in full[1] else full[1]
    assert stopped[1] == row1


def test_batch_rejects_an_empty_prompt(model: GPT) -> None:
    with pytest.raises(GptTuiError, match="empty"):
        generate_batch(model, [[1, 2], []], greedy(3))
