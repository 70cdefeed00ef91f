"""The CUDA path, run where a GPU is (``pytest -m cuda``; benchmarks/gpu_check.sh): bf16 and fp16 with
its scaler, the fused AdamW, the step that reads its figures a step late, the side-stream batches,
and generation with the KV cache equal to recomputation. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.events import read_metrics
from engine.model import GPT, ModelConfig
from engine.sampling import SampleSettings, generate
from engine.steps import StepReader
from engine.trainer import Trainer
from tests.conftest import tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(str(run / "metrics.jsonl")) if r["type"] == "step"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_training_learns_in_each_precision(corpus: Path, tmp_path: Path, dtype: str) -> None:
    t = Trainer(tiny_config(corpus, tmp_path / "run", device="cuda", dtype=dtype, max_steps=40, eval_every=0))
    t.setup()
    assert t.optimizer.defaults.get("fused"), "the fused AdamW on CUDA"
    assert (t.scaler is not None) == (dtype == "fp16")
    assert t.fit() == "finished"
    curve = losses(tmp_path / "run")
    assert len(curve) == 40 and all(x == x for x in curve)
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.2


def test_reading_a_step_late_changes_nothing(corpus: Path, tmp_path: Path) -> None:
    """The deferred reader and the side-stream batches give the losses of reading at once."""
    got = {}
    for deferred in (True, False):
        t = Trainer(tiny_config(corpus, tmp_path / f"r{deferred}", device="cuda", dtype="fp32", max_steps=20,
                                eval_every=7, checkpoint_every=5))
        t.setup()
        t.reader = StepReader(t.device, deferred=deferred)
        t.fit()
        got[deferred] = losses(tmp_path / f"r{deferred}")
    assert got[True] == pytest.approx(got[False], rel=1e-5)


def test_a_non_finite_step_never_reaches_the_weights(corpus: Path, tmp_path: Path) -> None:
    t = Trainer(tiny_config(corpus, tmp_path / "run", device="cuda", dtype="fp32", max_steps=4))
    t.setup()
    t.run_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    hooks = [p.register_hook(lambda g: g * float("nan")) for p in t.model.parameters()]
    _, _, finite = t.train_step()
    for h in hooks:
        h.remove()
    assert not bool(finite)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_kv_cache_generation_equals_recomputation() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, context_length=48, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    idx = torch.randint(0, 97, (3, 10), device="cuda")
    cached = generate(model, idx, SampleSettings(max_new_tokens=60, temperature=0.0, use_cache=True))
    plain = generate(model, idx, SampleSettings(max_new_tokens=60, temperature=0.0, use_cache=False))
    assert torch.equal(cached, plain)  # past the context too: the window slides the same way
