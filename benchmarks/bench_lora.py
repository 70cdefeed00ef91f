"""LoRA versus full finetuning: step time side by side, and a short instruction-finetuning run.

1. **Step time.** The gpt2 (124M) shape with random weights, one batch of ``--batch-size`` x
   ``--seq-len`` tokens; a full-finetuning step (AdamW over every weight) and a LoRA step
   (rank 16 on attention and MLP, base frozen) are timed alternately, as the trainer runs them
   (forward, backward, clip, optimizer step). Prints the medians and full / LoRA.
2. **Finetuning.** A small GPT with GPT-2's tokenizer is pretrained by gpt-tui's own trainer on
   tinyshakespeare (or ``--init`` one you have), then finetuned on the book's
   ``instruction-data.json``, fully and with LoRA; prints the val loss before and after.
3. **LoRA learning rate** (``--lora-lrs 5e-4,1e-3,2e-3``): the same LoRA finetuning at each rate,
   with finetuning's default schedule (warm-up, cosine decay to lr/10), and the val loss each ends
   at; how ``engine.config.LORA_LR`` was chosen.

    python benchmarks/bench_lora.py                         # both parts, CPU
    python benchmarks/bench_lora.py --quick                 # a few steps of each, to check it runs
    python benchmarks/bench_lora.py --device cuda --batch-size 8 --seq-len 1024 --skip-finetune
    python benchmarks/bench_lora.py --skip-timing --lora-lrs 2e-4,5e-4,1e-3,2e-3,5e-3,1e-2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("GPT_TUI_SHARED_DATA") or REPO.parent / "shared" / "data")

from engine.config import LORA_LR, TrainConfig  # noqa: E402
from engine.instruct import InstructTask  # noqa: E402
from engine.lora import apply_lora, count_parameters  # noqa: E402
from engine.model import GPT, preset_config  # noqa: E402
from engine.recorder import Recorder  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def make_step(model: GPT, device: torch.device):
    opt = model.configure_optimizer(lr=1e-5, weight_decay=0.1)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def bench_step_time(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset_config("gpt2", vocab_size=50257, qkv_bias=True, tie_weights=True, dropout=0.0)
    full = GPT(cfg).to(device).train()
    lora = GPT(cfg).to(device).train()
    lora.load_state_dict(full.state_dict())
    apply_lora(lora, args.rank, args.rank, args.layers)
    trainable, total = count_parameters(lora)
    print(f"gpt2 124M shape: {full.num_params():,} parameters; LoRA rank {args.rank} on {args.layers}: "
          f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
    steps = {"full": make_step(full, device), "lora": make_step(lora, device)}
    x = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, 50257, (args.batch_size, args.seq_len), device=device)
    times: dict[str, list[float]] = {"full": [], "lora": []}
    for i in range(args.warmup + args.steps):
        for name in ("full", "lora") if i % 2 == 0 else ("lora", "full"):
            t0 = time.perf_counter()
            steps[name](x, y)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"step time at batch {args.batch_size} x {args.seq_len} on {device} ({args.steps} steps each, median): "
          f"full {med['full']:.3f}s, LoRA {med['lora']:.3f}s; full / LoRA = {med['full'] / med['lora']:.2f}x")


def finetune_run(name: str, init: str, data: Path, work: Path, args: argparse.Namespace, constant: bool = True,
                 **kw) -> tuple[float, float]:
    """A finetuning of ``init``; ``constant``: the book's constant rate, else finetuning's default schedule."""
    schedule = {"warmup_steps": 0, "min_lr": kw.get("lr", 5e-5)} if constant else {}
    cfg = TrainConfig(data=[str(data)], init=init, tokenizer="gpt2", max_steps=args.finetune_steps,
                      batch_size=args.ft_batch, eval_every=max(1, args.finetune_steps // 4), eval_batches=5,
                      sample_every="0", test_responses=0, dropout=0.0, device=args.device, seed=args.seed,
                      out=str(work / name), **schedule, **kw)
    rec = Recorder()
    t = Trainer(cfg, rec, task=InstructTask())
    t.setup()
    before = t.evaluate()[1]
    t0 = time.perf_counter()
    t.fit()
    evals = rec.snapshot().evals
    trainable, total = count_parameters(t.model)
    print(f"  {name:5s}: val loss {before:.3f} -> {evals[-1].val_loss:.3f} after {t.step} steps "
          f"({' '.join(f'{e.val_loss:.3f}' for e in evals[1:])}); {trainable:,} of {total:,} trainable; "
          f"{time.perf_counter() - t0:.0f}s")
    return before, evals[-1].val_loss


def bench_finetune(args: argparse.Namespace) -> None:
    data = SHARED / "instruction-data.json"
    if not data.exists():
        print(f"skipping the finetuning run: {data} is absent")
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-lora-"))
    init = args.init
    if init is None:
        corpus = SHARED / "tinyshakespeare" / "input.txt"
        cfg = TrainConfig(data=[str(corpus)], preset="tiny", tokenizer="gpt2", n_layer=4, n_head=4, n_embd=128,
                          context=128, qkv_bias=True, tie_weights=True, dropout=0.0, batch_size=16,
                          max_steps=args.pretrain_steps, eval_every=0, eval_batches=5, sample_every="0",
                          lr=3e-3, device=args.device, out=str(work / "pretrain"))
        rec = Recorder()
        t = Trainer(cfg, rec)
        t.setup()
        t0 = time.perf_counter()
        t.fit()
        ev = rec.snapshot().evals[-1]
        print(f"pretrained {t.model.num_params():,} parameters (4 layers, 128 wide, context 128) on "
              f"tinyshakespeare for {t.step} steps: val loss {ev.val_loss:.3f} ({time.perf_counter() - t0:.0f}s)")
        init = str(work / "pretrain")
    print(f"finetuning on {data.name} (935 train / 55 val records), batch {args.ft_batch}:")
    if args.lora_lrs:
        ends = {}
        for lr in [float(v) for v in args.lora_lrs.split(",")]:
            ends[lr] = finetune_run(f"lora-{lr:g}", init, data, work, args, constant=False, lr=lr,
                                    lora_rank=args.rank, lora_alpha=float(args.rank), lora_layers=args.layers)[1]
        best = min(ends, key=ends.__getitem__)
        print(f"LoRA rank {args.rank} on {args.layers}, {args.finetune_steps} steps, default schedule: "
              + ", ".join(f"lr {lr:g} -> {v:.3f}" for lr, v in ends.items()) + f"; lowest val loss at lr {best:g}")
    else:
        finetune_run("full", init, data, work, args, lr=args.full_lr)
        finetune_run("lora", init, data, work, args, lr=args.lora_lr, lora_rank=args.rank,
                     lora_alpha=float(args.rank), lora_layers=args.layers)
    print(f"runs in {work}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=2, help="step-time batch (default 2)")
    ap.add_argument("--seq-len", type=int, default=256, help="step-time sequence length (default 256)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each kind (default 5)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", default="attn,mlp")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init", default=None, help="finetune this checkpoint/GPT-2 folder instead of pretraining one")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--finetune-steps", type=int, default=60)
    ap.add_argument("--ft-batch", type=int, default=8)
    ap.add_argument("--full-lr", type=float, default=5e-4)
    ap.add_argument("--lora-lr", type=float, default=LORA_LR)
    ap.add_argument("--lora-lrs", default=None, help="comma list: LoRA finetunings at each learning rate")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (checks that it runs)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.seq_len = 1, 0, 64
        args.pretrain_steps, args.finetune_steps = 4, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_timing:
        bench_step_time(args)
    if not args.skip_finetune:
        bench_finetune(args)


if __name__ == "__main__":
    main()
