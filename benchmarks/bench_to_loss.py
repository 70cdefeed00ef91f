"""Time to a target val loss, side by side: gpt-tui's engine against the book's code.

Trains character-level tiny shakespeare with nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
context 64, batch 12, dropout 0, lr 1e-3 with 100 warm-up steps and a cosine decay to 1e-4 over
2,000 steps) until the val loss reaches 1.90, once with gpt-tui's engine at its defaults (its
init, its bf16/fp32 choice, fused AdamW...) and once with the book's code: ``GPTModel`` from
``llms_from_scratch.ch04`` trained by the book's own loop, the real function from the package:

* ``--book-loop simple`` (default): ch05's ``train_model_simple`` with the book's
  ``AdamW(lr, weight_decay=0.1)``. It has no schedule, so it trains at the peak rate throughout.
* ``--book-loop appendix-d``: appendix D's ``train_model``, the book's loop with linear warm-up,
  cosine decay to ``min_lr`` and gradient clipping: the recipe's schedule.

How the two are kept comparable:

* Both see the same training windows in the same order (gpt-tui's data order; checked at
  start), and the loss is estimated the same way: after step 1, 1 + E, 1 + 2E, ... (where the
  book's loops evaluate: ``global_step % eval_freq == 0`` counting from 0), as the mean over the
  same ``--eval-batches`` val batches (and train batches) of gpt-tui's ``eval_batches``. The book's
  ``evaluate_model`` is wrapped to record its result (and stop at the target); its sample print
  at the end of an epoch is switched off.
* Each side runs in its own process (so gpt-tui's process settings do not reach the book's), and
  they take turns, one step (and its evaluation, if any) each: a busy machine slows both alike.
  A side's wall time is the sum of its turns, evaluations and the first step's warm-up included
  (the table shows the first step apart); setup (tokenizing, building the model) is not in it.

Examples::

    python benchmarks/bench_to_loss.py                          # gpt-tui vs the book to val 1.90
    python benchmarks/bench_to_loss.py --optimizer adamw,muon   # both optimizers and the book
    python benchmarks/bench_to_loss.py --optimizer adamw,muon --no-book --target 2.0
    python benchmarks/bench_to_loss.py --recipe verdict --set n_layer=4 --optimizer adamw,muon
    python benchmarks/bench_to_loss.py --quick                  # a smoke run (2 layers, to 3.0)

``--recipe verdict`` is the README's "book's run" (the-verdict, ``gpt2`` preset, context 256,
batch 2, lr 4e-4 constant, 10 epochs, no clipping, fp32, the book's init and betas) and its
default target ``book-min`` is the lowest val loss the book's run reaches: every side trains the
whole run, and each side's steps and time to that loss are read from its curve.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"

RECIPES: dict[str, dict[str, Any]] = {
    # nanoGPT's shakespeare_char on a CPU (its README): val about 1.88 after 2,000 steps.
    "shakespeare": dict(
        train=dict(data=[str(SHARED / "tinyshakespeare" / "input.txt")], preset="tiny", tokenizer="char",
                   n_layer=4, n_head=4, n_embd=128, context=64, batch_size=12, dropout=0.0, lr=1e-3,
                   min_lr=1e-4, warmup_steps=100, max_steps=2000),
        eval_every=100, eval_batches=20, target="1.90"),
    # The README's "book's run" (LLMs-from-scratch chapter 5).
    "verdict": dict(
        train=dict(data=[str(SHARED / "the-verdict.txt")], preset="gpt2", tokenizer="gpt2", context=256,
                   batch_size=2, lr=4e-4, min_lr=4e-4, warmup_steps=0, epochs=10, weight_decay=0.1,
                   grad_clip=0.0, dtype="fp32", weight_init="torch", beta2=0.999),
        eval_every=5, eval_batches=5, target="book-min"),
}
QUICK = dict(n_layer=2, max_steps=300, warmup_steps=10)
"""--quick: the shakespeare recipe on 2 layers, evaluated every 10 steps on 4 batches, to val 3.0."""


# ====================================================================== the sides
@dataclass
class Side:
    """One contestant: its name, how its process is started, and what it reported."""

    name: str
    kind: str  # "gpt-tui" or "book"
    optimizer: str = ""
    proc: Any = None
    conn: Any = None
    total_steps: int = 0
    first_batch: str = ""
    seconds: float = 0.0
    first_step: float = 0.0
    steps: int = 0
    done: bool = False
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, train, val, seconds)

    def reached(self, target: float) -> tuple[int, float] | None:
        """(steps, seconds) at the first evaluation with val <= target."""
        for step, _, val, secs in self.curve:
            if val <= target:
                return step, secs
        return None


def _batch_digest(x: Any, y: Any) -> str:
    return hashlib.sha1(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]


def _evaluates_after(step: int, every: int) -> bool:
    """The book's loops evaluate when ``global_step % eval_freq == 0``, global_step counting from 0."""
    return every > 0 and (step - 1) % every == 0


def _gpt_tui_side(conn: Any, cfg_dict: dict[str, Any], eval_every: int, target: float | None) -> None:
    """Child process: gpt-tui's Trainer.fit, one turn (step and evaluation) per 'go'."""
    import torch

    from engine.config import TrainConfig
    from engine.device import allow_peak_probe
    from engine.events import NullSink
    from engine.trainer import Trainer

    allow_peak_probe(False)  # no matmul probe thread running through the other sides' turns

    class RaceTrainer(Trainer):
        """Trainer.fit as it is, with a turn boundary where fit takes commands between steps."""

        _turn_open = False
        _finished = False
        _last_loss: Any = math.nan

        def train_step(self) -> Any:
            out = super().train_step()
            self._last_loss = out[0]  # a tensor, read at the end of the turn
            return out

        def evaluate(self) -> tuple[float, float]:  # fit's own evaluation after the last step: not raced
            return self.last_eval or (math.nan, math.nan)

        def save_checkpoint(self, reason: str = "periodic") -> str | None:  # nor its final checkpoint
            return None

        def _end_turn(self) -> None:
            if not self._turn_open:
                return
            self._turn_open = False
            ev = Trainer.evaluate(self) if _evaluates_after(self.step, eval_every) else None
            if (ev is not None and target is not None and ev[1] <= target) or self.step >= self.total_steps:
                self._finished = True
            conn.send(("turn", self.step, float(self._last_loss), ev, self._finished))

        def process_commands(self) -> None:
            self._end_turn()
            if self._finished:
                self.stop(save=False)
            elif conn.recv() != "go":
                self._finished = True
                self.stop(save=False)
            else:
                self._turn_open = True
            super().process_commands()

        def _finish(self, t_start: float) -> str:  # after the last step: end its turn first
            self._end_turn()
            return super()._finish(t_start)

    with tempfile.TemporaryDirectory(prefix="bench-to-loss-") as d:
        cfg = TrainConfig(**{**cfg_dict, "out": os.path.join(d, "run")})
        tr = RaceTrainer(cfg, NullSink())
        tr.setup()
        x, y = tr.batches.get(0, 0)
        conn.send(("ready", tr.total_steps, _batch_digest(x, y), tr.dtype, tr.model.num_params(),
                   torch.get_num_threads()))
        tr.fit()
    conn.send(("exit",))


def _race_data(cfg: Any) -> Any:
    """The windows gpt-tui's Trainer builds for ``cfg`` (tokenizer, split, order)."""
    from engine.data import TextData, build_char_tokenizer, load_tokens, resolve_sources, tokenize_to_cache
    from engine.tokenizer import GPT2Tokenizer

    files = resolve_sources(cfg.data)
    tok = build_char_tokenizer(files, cfg.text_field) if cfg.effective_tokenizer() == "char" else GPT2Tokenizer()
    tokens = load_tokens(tokenize_to_cache(files, tok, text_field=cfg.text_field))
    context = cfg.effective_context()
    return tok, TextData(tokens, context, cfg.stride or context, cfg.val_ratio, cfg.seed)


def _book_side(conn: Any, cfg_dict: dict[str, Any], eval_every: int, target: float | None, loop: str) -> None:
    """Child process: the book's GPTModel in the book's training loop, one turn per 'go'."""
    import torch

    from engine.config import TrainConfig
    from engine.setup import schedule

    sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (the book's loop prints every evaluation)
    if loop == "simple":
        from llms_from_scratch import ch05 as loop_module

        train_fn = loop_module.train_model_simple
    else:
        from llms_from_scratch import appendix_d as loop_module

        train_fn = loop_module.train_model
    from llms_from_scratch.ch04 import GPTModel

    cfg = TrainConfig(**cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok, data = _race_data(cfg)
    total = schedule(cfg, data.steps_per_epoch(cfg.batch_size * cfg.grad_accum))[0]
    if cfg.grad_accum != 1:
        raise SystemExit("the book's loops take one batch per step: use --set grad_accum=1")
    mc = cfg.model_config(tok.vocab_size)
    book_cfg = {"vocab_size": mc.vocab_size, "context_length": mc.context_length, "emb_dim": mc.n_embd,
                "n_heads": mc.n_head, "n_layers": mc.n_layer, "drop_rate": mc.dropout, "qkv_bias": mc.qkv_bias}
    torch.manual_seed(cfg.seed)
    model = GPTModel(book_cfg)
    # As chapter 5 calls train_model_simple: AdamW(lr, weight_decay=0.1), PyTorch's betas.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.peak_lr(), weight_decay=cfg.weight_decay)
    val_batches = list(data.eval_batches("val", cfg.eval_batches, cfg.batch_size))
    train_batches = list(data.eval_batches("train", cfg.eval_batches, cfg.batch_size))
    state: dict[str, Any] = {"eval": None, "finished": False, "step": 0, "loss": math.nan}

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spe = data.steps_per_epoch(cfg.batch_size)
        order_epoch, order = -1, None
        for step in range(total):
            if step > 0:
                end_turn(step)
                if state["finished"]:
                    return
            if conn.recv() != "go":
                return
            epoch, index = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = data.order(epoch), epoch
            yield data.train_batch(epoch, index, cfg.batch_size, order=order)
        end_turn(total)

    def end_turn(step: int) -> None:
        ev, state["eval"] = state["eval"], None
        if (ev is not None and target is not None and ev[1] <= target) or step >= total:
            state["finished"] = True
        conn.send(("turn", step, float(state["loss"]), ev, state["finished"]))

    class Loader:
        """The training stream for the loop; any further iteration (the loop's train-loss estimate)
        gets gpt-tui's train estimation batches, as the val loader holds its val batches."""

        def __init__(self) -> None:
            self.started = False

        def __len__(self) -> int:
            return total

        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            if self.started:
                return iter(train_batches)
            self.started = True
            return batches()

    original_evaluate = loop_module.evaluate_model
    original_batch_loss = loop_module.calc_loss_batch

    def evaluate_model(*args: Any, **kw: Any) -> tuple[float, float]:
        result = original_evaluate(*args, **kw)
        state["eval"] = result
        return result

    def calc_loss_batch(*args: Any, **kw: Any) -> torch.Tensor:
        loss = original_batch_loss(*args, **kw)
        if torch.is_grad_enabled():
            state["loss"] = loss.detach()
        return loss

    loop_module.evaluate_model = evaluate_model  # records the estimate; still the book's own
    loop_module.calc_loss_batch = calc_loss_batch  # records the step's loss (read after the step)
    loop_module.generate_and_print_sample = lambda *a, **k: None  # no sample print at the epoch's end
    x, y = data.train_batch(0, 0, cfg.batch_size, order=data.order(0))
    conn.send(("ready", total, _batch_digest(x, y), "fp32", sum(p.numel() for p in model.parameters()),
               torch.get_num_threads()))
    kwargs: dict[str, Any] = dict(model=model, train_loader=Loader(), val_loader=val_batches, optimizer=optimizer,
                                  device=torch.device("cpu"), eval_freq=eval_every, eval_iter=cfg.eval_batches,
                                  start_context="", tokenizer=None)
    if loop == "simple":
        train_fn(num_epochs=1, **kwargs)
    else:
        floor = cfg.min_lr if cfg.min_lr is not None else cfg.peak_lr() / 10
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total)
        train_fn(n_epochs=1, warmup_steps=warmup, initial_lr=cfg.initial_lr, min_lr=floor, **kwargs)
    conn.send(("exit",))


# ====================================================================== the race
def _float(v: Any) -> float:
    return float(v) if v is not None else math.nan


def race(sides: list[Side], cfg_dict: dict[str, Any], eval_every: int, target: float | None, book_loop: str,
         progress: bool = True) -> None:
    """Start every side, check they see the same first batch, then let them take turns to the end."""
    ctx = mp.get_context("spawn")
    for s in sides:
        parent, child = ctx.Pipe()
        if s.kind == "book":
            args = (child, cfg_dict, eval_every, target, book_loop)
            s.proc = ctx.Process(target=_book_side, args=args, daemon=True)
        else:
            args = (child, {**cfg_dict, "optimizer": s.optimizer}, eval_every, target)
            s.proc = ctx.Process(target=_gpt_tui_side, args=args, daemon=True)
        s.conn = parent
        s.proc.start()
        child.close()
    try:
        for s in sides:
            msg = _recv(s)
            _, s.total_steps, s.first_batch, dtype, n_params, threads = msg
            s.name += f" ({dtype}, {n_params / 1e6:.2f} M params, {threads} threads)"
        digests = {s.first_batch for s in sides}
        if len(digests) != 1 or len({s.total_steps for s in sides}) != 1:
            raise SystemExit(f"the sides do not see the same data: {[(s.name, s.first_batch, s.total_steps) for s in sides]}")
        t_start = time.time()
        active = list(sides)
        while active:
            for s in list(active):
                t0 = time.perf_counter()
                s.conn.send("go")
                msg = _recv(s)
                s.seconds += time.perf_counter() - t0
                _, step, loss, ev, finished = msg
                if step == 1:
                    s.first_step = s.seconds
                s.steps = step
                if ev is not None:
                    s.curve.append((step, _float(ev[0]), _float(ev[1]), s.seconds))
                    if progress:
                        print(f"  {time.time() - t_start:7.1f}s  {s.name.split(' (')[0]:<16} step {step:5d}  "
                              f"loss {_float(loss):.4f}  val {_float(ev[1]):.4f}  ({s.seconds:.1f}s own)",
                              file=sys.stderr, flush=True)
                if finished:
                    s.done = True
                    active.remove(s)
    finally:
        for s in sides:
            with contextlib.suppress(OSError, BrokenPipeError):
                s.conn.send("stop")
        for s in sides:
            s.proc.join(30)
            if s.proc.is_alive():
                s.proc.kill()


def _recv(s: Side) -> Any:
    try:
        return s.conn.recv()
    except (EOFError, OSError):
        s.proc.join(5)
        raise SystemExit(f"{s.name}: its process stopped (exit code {s.proc.exitcode}); see the error above") from None


# ====================================================================== report
def report(sides: list[Side], target: float, target_label: str) -> list[str]:
    lines = [f"target: val loss <= {target:.4f} ({target_label})", ""]
    head = f"{'side':<58} {'steps':>6} {'wall s':>8} {'s/step':>8} {'1st step':>8} {'best val':>9}"
    lines += [head, "-" * len(head)]
    reached = {}
    for s in sides:
        r = s.reached(target)
        reached[s.name] = r
        best = min((v for _, _, v, _ in s.curve), default=math.nan)
        per_step = s.seconds / max(1, s.steps)
        first = f"{s.first_step:8.2f}"
        if r is None:
            lines.append(f"{s.name:<58} {'-':>6} {'-':>8} {per_step:8.3f} {first} {best:9.4f}   not reached in {s.steps} steps")
        else:
            lines.append(f"{s.name:<58} {r[0]:6d} {r[1]:8.1f} {per_step:8.3f} {first} {best:9.4f}")
    base = next((s for s in sides if s.kind == "book"), sides[0])
    lines.append("")
    rb = reached[base.name]
    for s in sides:
        if s is base:
            continue
        r = reached[s.name]
        if r is None or rb is None:
            lines.append(f"{s.name.split(' (')[0]} vs {base.name.split(' (')[0]}: - (a side did not reach the target)")
            continue
        lines.append(f"{s.name.split(' (')[0]} vs {base.name.split(' (')[0]}: wall time {r[1] / rb[1]:.2f}x "
                     f"({rb[1] / r[1]:.2f}x faster), steps {r[0] / rb[0]:.2f}x, time per step "
                     f"{(r[1] / r[0]) / (rb[1] / rb[0]):.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="shakespeare")
    ap.add_argument("--target", help="val loss to reach (default: the recipe's; 'book-min': the book's best val)")
    ap.add_argument("--max-steps", type=int, help="length of the run and its schedule (default: the recipe's)")
    ap.add_argument("--optimizer", default="adamw", help="gpt-tui side(s): adamw, muon or adamw,muon")
    ap.add_argument("--dtype", help="gpt-tui's precision: auto (its default), fp32 or bf16 (the book's is fp32)")
    ap.add_argument("--data", action="append", help="corpus (default: the recipe's)")
    ap.add_argument("--eval-every", type=int, help="steps between loss estimates (default: the recipe's)")
    ap.add_argument("--eval-batches", type=int, help="batches per estimate (default: the recipe's)")
    ap.add_argument("--book-loop", choices=("simple", "appendix-d"), default="simple",
                    help="ch05 train_model_simple (constant rate) or appendix D train_model (warm-up, cosine, clipping)")
    ap.add_argument("--no-book", action="store_true", help="only gpt-tui's side(s)")
    ap.add_argument("--threads", type=int, help="torch threads of every side (default: gpt-tui's default for "
                    "its sides, torch's for the book's); 1 on a machine others are using")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any train setting (TrainConfig field), e.g. --set n_layer=4 --set weight_init=torch")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 layers, 300 steps at most, to val 3.0")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    from engine.config import TrainConfig
    from engine.device import cpu_name

    recipe = RECIPES[args.recipe]
    train = dict(recipe["train"])
    eval_every, eval_batches, target_s = recipe["eval_every"], recipe["eval_batches"], recipe["target"]
    if args.quick:
        train.update(QUICK)
        eval_every, eval_batches, target_s = 10, 4, "3.0"
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in TrainConfig.__dataclass_fields__:
            ap.error(f"--set {item}: {key} is not a train setting")
        default = TrainConfig.__dataclass_fields__[key].default
        train[key] = _parse_value(value, default if default is not None else train.get(key))
    if args.max_steps:
        train["max_steps"] = args.max_steps
    if args.dtype:
        train["dtype"] = args.dtype
    if args.threads:
        train["threads"] = args.threads
    if args.data:
        train["data"] = args.data
    eval_every = args.eval_every or eval_every
    eval_batches = args.eval_batches or eval_batches
    target_s = args.target or target_s
    train.update(eval_every=0, eval_batches=eval_batches, sample_every="0", device="cpu")
    missing = [f for f in train["data"] if not os.path.exists(f)]
    if missing:
        print(f"bench_to_loss: {', '.join(missing)} not found: give --data", file=sys.stderr)
        return 2
    TrainConfig(**train).validate()
    post_hoc = target_s == "book-min"
    if post_hoc and args.no_book:
        ap.error("--target book-min needs the book's side")
    target = None if post_hoc else float(target_s)

    sides = [Side(f"gpt-tui {o}", "gpt-tui", optimizer=o) for o in args.optimizer.split(",") if o]
    if not args.no_book:
        try:
            import llms_from_scratch.ch04  # noqa: F401
        except ImportError:
            print("bench_to_loss: needs the book's code: pip install --no-deps llms-from-scratch "
                  "(and matplotlib, tqdm for its ch05)", file=sys.stderr)
            return 2
        sides.append(Side(f"book ({args.book_loop})", "book"))

    load = os.getloadavg()
    print(f"recipe {args.recipe}{' (quick)' if args.quick else ''}: " +
          ", ".join(f"{k}={v}" for k, v in train.items() if k not in ("data", "eval_every", "sample_every", "device")),
          flush=True)
    print(f"data: {', '.join(train['data'])}; estimates after step 1 and every {eval_every} steps on "
          f"{eval_batches} batches; book loop: {args.book_loop}", flush=True)
    race(sides, train, eval_every, target, args.book_loop, progress=not args.quiet)
    load_end = os.getloadavg()
    if post_hoc:
        book = next(s for s in sides if s.kind == "book")
        target = min(v for _, _, v, _ in book.curve)
        target_label = "the book's lowest val loss"
    else:
        target_label = "given"
    import torch

    print(f"\nmachine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"load average {load[0]:.2f} at start, {load_end[0]:.2f} at end")
    print("\n".join(report(sides, target, target_label)))
    return 0


def _parse_value(text: str, like: Any) -> Any:
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    if text.lower() == "none":
        return None
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        return float(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
