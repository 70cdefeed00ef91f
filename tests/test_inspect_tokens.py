"""engine.inspect_tokens: token splits, next-token candidates, masked targets, the sample timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ck
from engine.errors import GptTuiError
from engine.inspect_tokens import (
    checkpoint_samples,
    instruction_batch,
    recorded_samples,
    run_dir_of,
    split_tokens,
    top_candidates,
    val_loss_at,
)
from engine.model import GPT, ModelConfig
from engine.sampling import SampleSettings, filter_logits
from engine.tokenizer import CharTokenizer, GPT2Tokenizer


def test_gpt2_split_shows_byte_tokens_of_chinese_characters() -> None:
    tok = GPT2Tokenizer()
    pieces = split_tokens(tok, "Hi 你好\n")
    assert [p.id for p in pieces] == tok.encode("Hi 你好\n")
    assert [p.index for p in pieces] == list(range(len(pieces)))
    by_char: dict[str, list[str]] = {}
    for p in pieces:
        if p.part_of:
            by_char.setdefault(p.part_of, []).append(p.piece)
            assert p.piece.startswith("<0x")
    # each character is split over several tokens whose bytes together are its UTF-8
    assert set(by_char) == {"你", "好"}
    for ch, parts in by_char.items():
        assert len(parts) >= 2
        hexes = "".join(parts).replace("<0x", "").replace(">", "")
        assert bytes.fromhex(hexes) == ch.encode("utf-8")
    assert pieces[0].piece == "Hi" and pieces[-1].piece == "\n" and not pieces[0].part_of


def test_char_split_and_unknown_characters() -> None:
    tok = CharTokenizer("ab ")
    assert [(p.id, p.piece) for p in split_tokens(tok, "ab a")] == [(1, "a"), (2, "b"), (0, " "), (1, "a")]
    with pytest.raises(GptTuiError, match="'z'"):
        split_tokens(tok, "az")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=30, context_length=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(10)
    return m.eval()


def test_top_candidates_follow_the_settings(model: GPT) -> None:
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,?")
    ids = tok.encode("abc")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1]
    raw = torch.softmax(logits, -1)
    top = top_candidates(model, ids, tok, 1.0, None, None, n=5)
    assert [c.id for c in top] == torch.topk(raw, 5).indices.tolist()
    assert all(abs(c.prob - c.raw_prob) < 1e-6 for c in top)  # T=1, nothing cut
    k2 = top_candidates(model, ids, tok, 0.7, 2, None, n=5)
    expect = filter_logits(logits[None], 0.7, 2, None)[0]
    assert [c.prob for c in k2[:2]] == pytest.approx([float(expect[c.id]) for c in k2[:2]])
    assert sum(c.prob for c in k2[:2]) == pytest.approx(1.0) and all(c.prob == 0 for c in k2[2:])
    greedy = top_candidates(model, ids, tok, 0.0, None, None, n=3)
    assert [c.prob for c in greedy] == [1.0, 0.0, 0.0]
    # longer than the context: cut from the left like generation
    long_ids = tok.encode("xyz" * 5 + "abc")
    assert [c.id for c in top_candidates(model, long_ids, tok, 1.0, None, None, n=3)] == \
        [c.id for c in top_candidates(model, long_ids[-8:], tok, 1.0, None, None, n=3)]
    with pytest.raises(GptTuiError, match="no text"):
        top_candidates(model, [], tok, 1.0, None, None)


def test_instruction_batch_masks_prompt_and_padding() -> None:
    tok = GPT2Tokenizer()
    records = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
               {"instruction": "Name a long river of Africa", "input": "", "output": "The Nile"}]
    rows = instruction_batch(tok, records)
    assert len(rows) == 2 and len(rows[0]) == len(rows[1])
    short = rows[0]
    kept = [p for p in short if p.target_id != -100]
    # only the response and one end-of-text are learned
    assert tok.decode([p.target_id for p in kept]) == "Hi!<|endoftext|>"
    assert short[0].target_id == -100 and short[-1].target_id == -100  # prompt, then padding
    unmasked = instruction_batch(tok, records, mask_prompt=False)[0]
    assert sum(p.target_id != -100 for p in unmasked) > len(kept)
    with pytest.raises(GptTuiError, match="end-of-text"):
        instruction_batch(CharTokenizer("ab"), records)


def test_val_loss_and_recorded_samples(tmp_path: Path) -> None:
    evals = [{"step": 5, "val_loss": 3.0}, {"step": 10, "val_loss": 2.5}]
    assert val_loss_at(evals, 4) is None and val_loss_at(evals, 5) == 3.0 and val_loss_at(evals, 12) == 2.5
    lines = [{"type": "eval", "step": 5, "train_loss": 3.1, "val_loss": 3.0},
             {"type": "sample", "step": 10, "epoch": 1, "text": "second", "prompt": "p"},
             {"type": "sample", "step": 5, "epoch": 0, "text": "first", "prompt": "p"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"type": "sam')
    got = recorded_samples(str(tmp_path))
    assert [(e.step, e.text, e.val_loss, e.kind) for e in got] == [(5, "first", 3.0, "recorded"),
                                                                  (10, "second", 3.0, "recorded")]


def test_run_dir_of(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001.pt"
    ckpt.parent.mkdir(parents=True)
    assert run_dir_of(str(ckpt)) == str(tmp_path / "run")
    assert run_dir_of(str(tmp_path / "run")) == str(tmp_path / "run")
    assert run_dir_of(str(tmp_path / "loose.pt")) is None


def _save(run: Path, step: int, model: GPT, tok: CharTokenizer, val: float | None) -> str:
    c = ck.Checkpoint(model=model.state_dict(), model_config=model.cfg.to_dict(), tokenizer=tok.spec(),
                      train_config={}, step=step)
    return ck.save_checkpoint(ck.checkpoint_name(str(run), step), c, ck.CheckpointMeta(step=step, val_loss=val))


def test_checkpoint_samples_same_seed_skip_and_damage(tmp_path: Path) -> None:
    tok = CharTokenizer("abc ")
    run = tmp_path / "run"
    torch.manual_seed(1)
    models = [GPT(ModelConfig(vocab_size=4, context_length=8, n_layer=1, n_head=1, n_embd=8)) for _ in range(3)]
    paths = [_save(run, s, m, tok, v) for s, m, v in zip((10, 20, 30), models, (2.0, None, 1.0), strict=True)]
    (run / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": 15, "val_loss": 1.7}) + "\n")
    settings = SampleSettings(max_new_tokens=12, temperature=1.0, top_k=None)
    a = list(checkpoint_samples(str(run), "ab", settings))
    b = list(checkpoint_samples(str(run), "ab", settings))
    assert [(e.step, e.val_loss) for e in a] == [(10, 2.0), (20, 1.7), (30, 1.0)]  # 20: from metrics
    assert [e.text for e in a] == [e.text for e in b]  # seed 0 unless set
    assert all(len(e.text) == 12 and e.kind == "checkpoint" and e.prompt == "ab" for e in a)
    assert [e.step for e in checkpoint_samples(str(run), "ab", settings, skip={paths[0]}.__contains__)] == [20, 30]
    # damage one (same size, other bytes): its entry says so, the others still come
    data = bytearray(Path(paths[1]).read_bytes())
    data[-100] ^= 0xFF
    Path(paths[1]).write_bytes(bytes(data))
    c = list(checkpoint_samples(str(run), "ab", settings))
    assert c[1].error and "corrupt" in c[1].error and not c[1].text
    assert c[0].text == a[0].text and c[2].text == a[2].text
    # a prompt the model cannot take is an error for the whole run
    with pytest.raises(GptTuiError, match="'z'"):
        list(checkpoint_samples(str(run), "az", settings))
