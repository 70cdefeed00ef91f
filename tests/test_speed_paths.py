"""The fast paths give the losses of a plain fp32 reference, and the bench measures for real."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.model import GPT, ModelConfig, linear_cross_entropy
from tests.conftest import run_cli, tiny_config

CFG = dict(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def reference_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The textbook path: full logits, an fp32 copy, F.cross_entropy."""
    logits = model.head(model.hidden(x))
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


def batch(vocab: int = 97, b: int = 3, t: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_chunked_loss_equals_cross_entropy_on_full_logits(chunk_rows: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(5, 9, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=True)
    t = torch.randint(0, 300, (5, 9))
    t[0, :4] = -100  # ignored positions (masked prompts, padding)
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), t.flatten(), ignore_index=-100)
    rh, rw = torch.autograd.grad(ref * 3.0, [h, w])
    out = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    oh, ow = torch.autograd.grad(out * 3.0, [h, w])
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(oh, rh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ow, rw, rtol=1e-5, atol=1e-7)
    assert oh[0, :4].abs().max() == 0  # ignored rows get no gradient
    with torch.no_grad():  # loss-only evaluation
        assert linear_cross_entropy(h, w, t, chunk_rows=chunk_rows).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_and_gradients_match_the_reference_in_fp32(tie: bool) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG, tie_weights=tie))
    x, y = batch()
    ref = reference_loss(model, x, y)
    g_ref = grads(model, ref)
    fast = model(x, y)
    g_fast = grads(model, fast)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-6)
    assert g_fast.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g_fast[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bf16_autocast_loss_and_gradients_close_to_the_reference() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG))
    x, y = batch()
    ref = reference_loss(model, x, y)
    g_ref = grads(model, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(x, y)
    g_fast = grads(model, fast)
    assert fast.dtype == torch.float32
    assert fast.item() == pytest.approx(ref.item(), rel=1e-2)
    for n in ("head.weight", "blocks.0.mlp.fc.weight", "tok_emb.weight"):
        cos = F.cosine_similarity(g_fast[n].flatten(), g_ref[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos)


def test_a_wrapped_head_takes_the_reference_path() -> None:
    class Scaled(nn.Module):  # stands for any non-plain head (e.g. LoRA's wrapper)
        def __init__(self, inner: nn.Linear) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return 2.0 * self.inner(h)

    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG))
    x, y = batch()
    plain = model(x, y).item()
    model.head = Scaled(model.head)
    expected = F.cross_entropy(model.head(model.hidden(x)).flatten(0, 1), y.flatten()).item()
    assert model(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert model(x, y).item() != pytest.approx(plain, rel=1e-3)


def test_flops_per_token_leaves_out_the_embedding_lookup() -> None:
    cfg = ModelConfig(**CFG)
    m = GPT(cfg)
    body = m.num_params() - m.tok_emb.weight.numel() - m.pos_emb.weight.numel()
    assert m.flops_per_token(16) == 6 * body + 12 * cfg.n_layer * cfg.n_embd * 16
    tied = GPT(ModelConfig(**CFG, tie_weights=True))
    assert tied.flops_per_token(16) == 6 * (tied.num_params() - tied.pos_emb.weight.numel()) + 12 * 2 * 32 * 16


def _train(dtype: torch.dtype | None, fused: bool, steps: int = 25) -> list[float]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CFG))
    opt = model.configure_optimizer(3e-3, 0.1, fused=fused)
    losses = []
    for i in range(steps):
        x, y = batch(seed=i % 5)
        with torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext():
            loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_training_tracks_fp32_and_fused_adamw_matches_foreach() -> None:
    ref = _train(None, fused=False)
    fused = _train(None, fused=True)
    bf16 = _train(torch.bfloat16, fused=True)
    assert ref[-1] < ref[0] - 0.5  # it learns
    assert fused == pytest.approx(ref, rel=1e-4)
    assert bf16[-1] == pytest.approx(ref[-1], rel=0.03)


def test_trainer_fp16_scaler_only_on_cuda(corpus, tmp_path) -> None:
    from engine.trainer import Trainer

    tr = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=2))
    tr.setup()
    assert tr.scaler is None and tr.dtype == "fp32"


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple's MPS device")
def test_mps_path_fp32_default_autocast_and_no_compile(corpus, tmp_path) -> None:
    from engine.device import resolve_dtype
    from engine.errors import GptTuiError
    from engine.trainer import Trainer

    mps = torch.device("mps")
    assert resolve_dtype("auto", mps) == "fp32"
    for dt in ("auto", "bf16"):
        tr = Trainer(tiny_config(corpus, tmp_path / f"run-{dt}", device="mps", dtype=dt, max_steps=3))
        tr.setup()
        assert tr.scaler is None
        assert tr.fit() == "finished"
        assert torch.isfinite(torch.tensor(list(tr.guard.recent))).all()
    with pytest.raises(GptTuiError, match="compile"):
        Trainer(tiny_config(corpus, tmp_path / "run-c", device="mps", compile=True)).setup()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_uses_a_scaler_and_bf16_does_not(corpus, tmp_path) -> None:
    from engine.trainer import Trainer

    for dt, scaled in (("fp16", True), ("bf16", False)):
        tr = Trainer(tiny_config(corpus, tmp_path / f"run-{dt}", device="cuda", dtype=dt, max_steps=3))
        tr.setup()
        assert (tr.scaler is not None) == scaled
        assert tr.fit() == "finished"


def test_memory_stays_flat_over_many_steps_of_tiny(corpus, tmp_path) -> None:
    from engine.bench import memory_soak

    cfg = tiny_config(corpus, tmp_path / "unused", max_steps=600, eval_every=0, n_embd=16, context=16,
                      batch_size=2)
    res = memory_soak(cfg, samples=12, max_points=64)
    assert res.recorder_points <= 64  # the dashboard's buffer is thinned, not grown
    assert len(res.samples) >= 10
    growth = res.growth_mb()
    assert growth is not None and growth < 25, res.samples


def test_measured_peak_is_stored_for_mfu() -> None:
    from engine.bench import device_peaks
    from engine.device import measured_peak

    (p,) = device_peaks(torch.device("cpu"), ["fp32"], size=128)
    assert p.source.startswith("measured") and p.flops > 0
    assert measured_peak("cpu", "fp32") == p.flops
    (g,) = device_peaks(torch.device("cpu"), ["bf16"], given=5e12)  # --peak-flops: kept for training too
    assert g.flops == 5e12 and g.source == "given"
    assert measured_peak("cpu", "bf16") == 5e12 and measured_peak("cpu", "fp32") == p.flops


def test_bench_cli_table_json_and_the_book(corpus, tmp_path) -> None:
    """One bench run (sharing its torch start-up): every part, the table on stdout, the JSON in --save."""
    book = importlib.util.find_spec("llms_from_scratch") is not None
    out = tmp_path / "bench.json"
    r = run_cli("bench", "--presets", "tiny:2x16", "--steps", "2", "--only", "peak,train,generate,tokenize,launch,memory",
                "--gen-presets", "tiny", "--gen-tokens", "4", "--memory", "tiny:2x16", "--data", str(corpus),
                "--threads", "1", "--save", str(out), *(["--compare"] if book else []))
    assert r.returncode == 0, r.stderr
    assert "first step after" in r.stdout and "Peak memory, tiny at batch 2 x 16" in r.stdout
    rep = json.loads(out.read_text())
    (t,) = rep["train"]
    assert (t["preset"], t["batch_size"], t["context"], t["tokenizer"]) == ("tiny", 2, 16, "char")
    assert t["tokens_per_sec"] > 0 and 0 < t["mfu"] < 1  # the peak measured first gives an MFU
    if book:
        assert t["book_tokens_per_sec"] > 0 and t["ratio"] > 0 and "book tok/s" in r.stdout
    (g,) = rep["generate"]
    assert g["cached_tokens_per_sec"] > 0 and g["uncached_tokens_per_sec"] > 0
    assert {x["tokenizer"] for x in rep["tokenize"]} == {"gpt2", "char"}
    assert all(x["mb_per_sec"] > 0 for x in rep["tokenize"])
    assert rep["machine"]["torch"] == torch.__version__


def test_bench_compare_without_the_package_is_one_clear_line(corpus) -> None:
    code = ("import sys; sys.modules['llms_from_scratch'] = None; sys.argv = ['gpt-tui'] + sys.argv[1:]; "
            "from tui.cli import main; main()")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code, "bench", "--presets", "tiny:2x16", "--steps", "1", "--only",
                        "train", "--compare", "--data", str(corpus)], capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llms-from-scratch" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bench_rejects_bad_presets() -> None:
    r = run_cli("bench", "--presets", "tiny:2by16")
    assert r.returncode != 0 and "BATCHxCONTEXT" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_optimizer_bench_times_the_three_adamw_implementations() -> None:
    from engine.bench import bench_optimizer

    r = bench_optimizer("tiny", vocab_size=97, steps=2)
    assert set(r.step_ms) == {"for-loop", "foreach", "fused"}
    assert all(v > 0 for v in r.step_ms.values()) and r.fused_speedup > 0


def test_threads_bench_trains_at_each_count_and_restores_the_setting(corpus, tmp_path) -> None:
    from engine.bench import bench_threads

    before = torch.get_num_threads()
    r = bench_threads(tiny_config(corpus, tmp_path / "unused", threads=None), [1, 2], steps=1)
    assert set(r.tokens_per_sec) == {1, 2} and all(v > 0 for v in r.tokens_per_sec.values())
    assert r.best in (1, 2)
    assert torch.get_num_threads() == before


def _thp_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator tuning is for glibc (Linux)")
@pytest.mark.parametrize("malloc", ["tuned", "default"])
def test_freed_memory_is_reused_without_page_faults(malloc: str) -> None:
    if malloc == "default" and _thp_always():
        pytest.skip("with transparent huge pages always on, fresh mappings fault in 2 MB pages")
    # A step's worth of tensors (two above glibc's 32 MB mmap limit) made and freed six times:
    # glibc's default maps the big ones anew each time and the kernel faults them in (one fault
    # per 4 kB page, 89,163 over cycles 3-6 here); kept, the memory is reused.
    code = (
        "import resource, torch\n"
        "from engine.device import keep_freed_memory\n"
        "print(keep_freed_memory())\n"
        "faults = []\n"
        "for cycle in range(6):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    xs = [torch.ones(n) for n in (10_000_000, 12_000_000, 300_000, 1_000_000)]\n"
        "    del xs\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(sum(faults[2:]))\n"
    )
    env = dict(os.environ, GPT_TUI_MALLOC="default" if malloc == "default" else "")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    applied, faults = r.stdout.split()
    if malloc == "tuned":
        assert applied == "True" and int(faults) < 40_000, r.stdout  # measured 11,700-19,500
    else:
        assert applied == "False" and int(faults) > 80_000, r.stdout  # measured 89,163 every time


def test_only_big_models_get_the_allocator_tuning(corpus, tmp_path) -> None:
    from engine.config import TrainConfig
    from engine.setup import KEEP_MEMORY_FROM_PARAMS, expected_params
    from engine.trainer import Trainer

    assert expected_params(TrainConfig(preset="tiny")) < KEEP_MEMORY_FROM_PARAMS  # one arena slows it down
    assert expected_params(TrainConfig(preset="small", tokenizer="char")) > KEEP_MEMORY_FROM_PARAMS
    assert expected_params(TrainConfig(preset="gpt2")) > 120_000_000
    assert expected_params(TrainConfig(init="gpt2-folder")) is None  # unknown until loaded: tuned
    t = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=1))
    t.setup()
    t.fit()
    n = t.model.num_params()
    assert expected_params(TrainConfig(resume=str(tmp_path / "run"))) == n
    assert expected_params(TrainConfig(resume=t.last_checkpoint)) == n


# ------------------------------------------------------------------ the step and the host
def test_the_step_reads_nothing_back_from_the_device(corpus, tmp_path, monkeypatch) -> None:
    """train_step never calls .item(), float(), bool() or .cpu() on a tensor: on CUDA that would wait for the GPU."""
    from engine.trainer import Trainer

    t = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=6, grad_clip=1.0, dropout=0.1))
    t.setup()
    t.run_step()  # warm-up outside the watch

    def refuse(name):
        def read(self, *a, **kw):
            raise AssertionError(f"the step read a tensor back with {name}")
        return read

    for name in ("item", "__float__", "__bool__", "__int__", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    for _ in range(3):
        loss, gnorm, finite = t.train_step()
    monkeypatch.undo()
    assert torch.isfinite(loss) and bool(finite) and float(gnorm) > 0


def test_reading_a_step_late_gives_the_same_events(corpus, tmp_path) -> None:
    """The deferred reader (what CUDA uses) reports every step once, in order, with the same figures."""
    from engine.events import read_metrics
    from engine.steps import StepReader
    from engine.trainer import Trainer

    losses = {}
    for deferred in (False, True):
        t = Trainer(tiny_config(corpus, tmp_path / f"run{deferred}", max_steps=12, eval_every=5, checkpoint_every=4))
        t.setup()
        t.reader = StepReader(t.device, deferred=deferred)
        t.fit()
        recs = read_metrics(str(tmp_path / f"run{deferred}" / "metrics.jsonl"))
        steps = [r["step"] for r in recs if r["type"] == "step"]
        assert steps == list(range(1, 13))
        # a step's event comes before the eval and the checkpoint of the same step
        order = [(r["type"], r["step"]) for r in recs if r["type"] in ("step", "eval", "checkpoint")]
        for kind, s in order:
            if kind != "step":
                assert order.index(("step", s)) < order.index((kind, s))
        losses[deferred] = [r["loss"] for r in recs if r["type"] == "step"]
    assert losses[True] == losses[False]


def test_a_non_finite_step_is_skipped_on_the_device(corpus, tmp_path) -> None:
    """The fused optimizer skips a step whose gradients are not finite without any host read."""
    from engine.trainer import Trainer

    t = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=4))
    t.setup()
    assert t.optimizer.defaults.get("fused"), "CPU training uses the fused AdamW"
    t.run_step()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    moments = {i: s["exp_avg"].clone() for i, s in t.optimizer.state_dict()["state"].items()}
    for p in t.model.parameters():  # a NaN gradient, as a bad batch would make
        p.register_hook(lambda g: g * float("nan"))
    _, _, finite = t.train_step()
    assert not bool(finite)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(torch.equal(moments[i], s["exp_avg"]) for i, s in t.optimizer.state_dict()["state"].items())


@pytest.mark.slow
def test_compile_compiles_once(corpus, tmp_path) -> None:
    """--compile: one compilation in the first step, no recompiles after (dynamo's counters)."""
    pytest.importorskip("torch._dynamo")
    import torch._dynamo
    from torch._dynamo.utils import counters

    from engine.recorder import Recorder
    from engine.trainer import Trainer

    torch._dynamo.reset()
    counters.clear()
    rec = Recorder()
    t = Trainer(tiny_config(corpus, tmp_path / "run", max_steps=6, eval_every=3, compile=True), rec)
    t.setup()
    try:
        assert t.fit() == "finished"
    except Exception as e:  # noqa: BLE001 - no C compiler or inductor backend here
        pytest.skip(f"torch.compile does not work on this machine: {e}")
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    from engine.events import read_metrics

    seen = [r["state"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if r["type"] == "state"]
    assert seen[:2] == ["compiling", "running"]
