"""LoRA: trainable counts, a frozen base, adapter-only checkpoints, resume, merged export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine import checkpoint as ck
from engine.errors import CheckpointError, GptTuiError
from engine.events import StepEvent
from engine.inference import load_for_inference
from engine.lora import LoRALinear, apply_lora, count_parameters, lora_state_dict
from engine.model import GPT, ModelConfig, preset_config
from engine.weights import load_weights, model_from_checkpoint

from .conftest import run_cli
from .gpt2_fixtures import finetune_trainer, tiny_gpt2_checkpoint
from .test_instruct import finetune_config, make_records, write_records


def gpt2_124m_on_meta(layers: str | None = None, rank: int = 16) -> GPT:
    with torch.device("meta"):
        model = GPT(preset_config("gpt2", vocab_size=50257, qkv_bias=True, tie_weights=True))
        if layers:
            apply_lora(model, rank, 16, layers)
    return model


def test_trainable_counts_on_gpt2_124m() -> None:
    base = gpt2_124m_on_meta()
    assert base.num_params() == 124_439_808
    # r * (in + out) per wrapped layer; per block qkv 768->2304, proj 768->768, fc 768->3072, proj 3072->768
    per_block_attn = 16 * (768 + 2304) + 16 * (768 + 768)
    per_block_mlp = 16 * (768 + 3072) + 16 * (3072 + 768)
    head = 16 * (768 + 50257)
    expected = {"attn": 12 * per_block_attn, "mlp": 12 * per_block_mlp, "attn,mlp": 12 * (per_block_attn + per_block_mlp),
                "attn,mlp,head": 12 * (per_block_attn + per_block_mlp) + head}
    assert expected["attn,mlp"] == 2_359_296 and expected["attn,mlp,head"] == 3_175_696
    for layers, n in expected.items():
        trainable, total = count_parameters(gpt2_124m_on_meta(layers))
        assert (trainable, total) == (n, 124_439_808 + n), layers


def test_fresh_adapters_leave_the_output_unchanged() -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                            qkv_bias=True, tie_weights=True)).eval()
    idx = torch.randint(0, 97, (2, 9))
    before = model(idx)
    wrapped = apply_lora(model, 4, 8.0, "attn,mlp,head")
    assert sorted(wrapped) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.0.mlp.proj",
                               "blocks.1.attn.proj", "blocks.1.attn.qkv", "blocks.1.mlp.fc", "blocks.1.mlp.proj", "head"]
    assert isinstance(model.head, LoRALinear) and model.head.scaling == 2.0
    assert torch.equal(model(idx), before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(GptTuiError, match="unknown LoRA layer group 'ffn'"):
        apply_lora(model, 4, 8.0, "ffn")


# ------------------------------------------------------------- a LoRA run
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("lora")
    init = tiny_gpt2_checkpoint(tmp / "init.pt", n_layer=2)
    data = write_records(tmp / "data.json", make_records(40))
    cfg = finetune_config(tmp, init, data, lora_rank=4, lora_alpha=8.0, lora_layers="attn,mlp,head", lr=1e-2,
                          sample_every="0", test_responses=1)
    t = finetune_trainer(cfg)
    t.setup()
    assert t.fit() == "finished"
    return {"tmp": tmp, "init": init, "data": data, "run": tmp / "run", "trainer": t}


def test_base_is_frozen_and_adapters_learn(lora_run: dict) -> None:
    t = lora_run["trainer"]
    base = load_weights(str(lora_run["init"])).state_dict()
    live = t.model.state_dict()
    for name, value in base.items():
        parts = name.rsplit(".", 1)
        wrapped = f"{parts[0]}.base.{parts[1]}"
        assert torch.equal(live[wrapped] if wrapped in live else live[name], value), name
    adapters = lora_state_dict(t.model)
    assert len(adapters) == 2 * 9
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith("lora_b"))  # B started at zero


def test_checkpoint_holds_only_adapters_and_the_base_reference(lora_run: dict) -> None:
    c = ck.load_checkpoint(str(lora_run["run"]))
    assert c.kind == "lora" and c.meta["kind"] == "lora"
    assert c.model.keys() == lora_state_dict(lora_run["trainer"].model).keys()
    info = c.lora
    assert info["base"] == str(lora_run["init"]) and info["base_sha256"] == ck.read_meta(str(lora_run["init"]))["sha256"]
    assert (info["rank"], info["alpha"], info["layers"]) == (4, 8.0, "attn,mlp,head")
    assert c.extra["template"] == "alpaca"


def test_merged_export_equals_adapter_forward(lora_run: dict) -> None:
    adapted = model_from_checkpoint(ck.load_checkpoint(str(lora_run["run"])), merge=False).eval()
    out = lora_run["tmp"] / "merged.pt"
    r = run_cli("export", str(lora_run["run"]), "--out", str(out))
    assert r.returncode == 2 and "add --merge" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("export", str(lora_run["run"]), "--merge", "--out", str(out))
    assert r.returncode == 0, r.stderr
    merged = ck.load_checkpoint(str(out))
    assert merged.kind == "full" and merged.extra["template"] == "alpaca"
    assert not merged.model_config["tie_weights"]  # the head's adapter made it differ from the embedding
    lm = load_for_inference(str(out), "cpu")
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(idx), adapted(idx), rtol=1e-5, atol=1e-5)
    r = run_cli("generate", str(lora_run["run"]), "--prompt", "What is 3 plus one?", "-n", "4", "-t", "0")
    assert r.returncode == 0, r.stderr


def test_lora_resume_continues_exactly(lora_run: dict, tmp_path: Path) -> None:
    init, data = lora_run["init"], lora_run["data"]
    kw = dict(lora_rank=4, lora_alpha=8.0, lora_layers="attn,mlp,head", lr=1e-2, sample_every="0", test_responses=0)

    class StopAt2:
        trainer: Any

        def emit(self, e) -> None:
            if isinstance(e, StepEvent) and e.step == 2:
                self.trainer.stop(save=True)

    sink = StopAt2()
    t = finetune_trainer(finetune_config(tmp_path, init, data, **kw), sink)
    sink.trainer = t
    t.setup()
    assert t.fit() == "stopped" and t.step == 2
    resumed = finetune_trainer(finetune_config(tmp_path, init, data, resume=str(tmp_path / "run"), **kw))
    resumed.setup()
    assert resumed.step == 2
    assert resumed.fit() == "finished"
    a = lora_state_dict(resumed.model)
    b = lora_state_dict(lora_run["trainer"].model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_changed_or_missing_base_is_refused(lora_run: dict, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run["run"], run)
    init = Path(lora_run["init"])
    saved = {p: p.read_bytes() for p in (init, Path(ck.meta_path(str(init))))}
    try:
        tiny_gpt2_checkpoint(init, n_layer=2, seed=1)  # other weights at the same path
        with pytest.raises(CheckpointError, match="changed since the adapters were trained"):
            load_for_inference(str(run), "cpu")
        init.unlink()
        with pytest.raises(CheckpointError, match="base weights of this LoRA checkpoint .* are missing"):
            load_for_inference(str(run), "cpu")
    finally:
        for p, b in saved.items():
            p.write_bytes(b)


def test_adapters_of_another_rank_or_layer_set_are_named() -> None:
    from engine.lora import load_lora_state

    cfg = ModelConfig(vocab_size=40, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model, other_rank, attn_only = GPT(cfg), GPT(cfg), GPT(cfg)
    apply_lora(model, 4, 8, "attn,mlp")
    apply_lora(other_rank, 2, 8, "attn,mlp")
    apply_lora(attn_only, 4, 8, "attn")
    load_lora_state(model, lora_state_dict(model))  # its own adapters fit
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.lora_a: checkpoint \(2, 16\) vs model \(4, 16\)"):
        load_lora_state(model, lora_state_dict(other_rank))
    with pytest.raises(CheckpointError, match=r"missing adapters: blocks\.0\.mlp"):
        load_lora_state(model, lora_state_dict(attn_only))
    with pytest.raises(CheckpointError, match=r"unexpected adapters: blocks\.0\.mlp"):
        load_lora_state(attn_only, lora_state_dict(model))
