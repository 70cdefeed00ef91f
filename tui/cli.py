"""The ``gpt-tui`` command line."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from .common import DEBUG, SignalStopper, fail, friendly_errors, has_terminal

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train GPT-style language models from scratch and watch them learn.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    if debug:
        DEBUG["on"] = True


def config_from_flags(flags: dict[str, Any], config_file: str | None) -> Any:
    """A TrainConfig from a TOML file (if any) overlaid with the flags that were given."""
    from engine.config import TrainConfig, load_toml

    base: dict[str, Any] = load_toml(config_file) if config_file else {}
    explicit = set(base)
    for k, v in flags.items():
        if v is None or (k in ("data", "log") and not v):
            continue
        base[k] = list(v) if k in ("data", "log") else v
        explicit.add(k)
    cfg = TrainConfig.from_dict(base)
    cfg._explicit = explicit  # type: ignore[attr-defined]
    cfg.validate()
    return cfg


# Options shared by train and finetune.
def _o(default: Any, *names: str, help: str) -> Any:  # noqa: A002
    return typer.Option(default, *names, help=help, show_default=False)


@app.command()
@friendly_errors
def train(
    data: list[str] = _o(None, "--data", "-d", help="Text, .jsonl(.gz) or .parquet file, folder, glob, or named corpus (python-docs, the-verdict, tinyshakespeare); repeatable. Default: the embedded python-docs corpus."),
    text_field: str = _o(None, "--text-field", help="Field of the text in .jsonl/.parquet records (default text)."),
    preset: str = _o(None, "--preset", help="bigram, tiny (default), small, gpt2, gpt2-medium, gpt2-large, gpt2-xl."),
    tokenizer: str = _o(None, "--tokenizer", help="gpt2 (default) or char."),
    context: int = _o(None, "--context", help="Tokens per window (default: the preset's)."),
    stride: int = _o(None, "--stride", help="Distance between window starts (default: the context)."),
    val_ratio: float = _o(None, "--val-ratio", help="Fraction held out for validation (default 0.1)."),
    batch_size: int = _o(None, "--batch-size", "-b", help="Windows per micro-batch (default 8)."),
    grad_accum: int = _o(None, "--grad-accum", help="Micro-batches per optimizer step (default 1)."),
    epochs: int = _o(None, "--epochs", help="Passes over the training windows (default 1)."),
    max_steps: int = _o(None, "--max-steps", help="Stop after this many optimizer steps."),
    lr: float = _o(None, "--lr", help="Peak learning rate (default 4e-4)."),
    initial_lr: float = _o(None, "--initial-lr", help="Learning rate at step 0 (default 0)."),
    min_lr: float = _o(None, "--min-lr", help="Learning rate at the end of the cosine decay (default lr/10)."),
    warmup_steps: int = _o(None, "--warmup-steps", help="Linear warm-up steps (default 5% of the run)."),
    weight_decay: float = _o(None, "--weight-decay", help="AdamW weight decay on matrices (default 0.1)."),
    beta1: float = _o(None, "--beta1", help="AdamW beta1 (default 0.9)."),
    beta2: float = _o(None, "--beta2", help="AdamW beta2 (default 0.95; the book's is 0.999)."),
    grad_clip: float = _o(None, "--grad-clip", help="Clip the gradient norm (default 1.0; 0: off)."),
    dropout: float = _o(None, "--dropout", help="Dropout (default: the preset's)."),
    qkv_bias: bool = _o(None, "--qkv-bias/--no-qkv-bias", help="Bias on query/key/value."),
    tie_weights: bool = _o(None, "--tie-weights/--no-tie-weights", help="Tie the LM head to the embedding."),
    n_layer: int = _o(None, "--n-layer", help="Override the preset's layers."),
    n_head: int = _o(None, "--n-head", help="Override the preset's heads."),
    n_embd: int = _o(None, "--n-embd", help="Override the preset's width."),
    weight_init: str = _o(None, "--weight-init", help="gpt2 (default: std 0.02) or torch (PyTorch defaults, as the book)."),
    eval_every: int = _o(None, "--eval-every", help="Evaluate every N steps (default 100)."),
    eval_batches: int = _o(None, "--eval-batches", help="Batches per loss estimate (default 10)."),
    sample_every: str = _o(None, "--sample-every", help="'epoch' (default), N steps, or 0."),
    prompt: str = _o(None, "--prompt", help="Start context of the periodic samples."),
    sample_tokens: int = _o(None, "--sample-tokens", help="New tokens per periodic sample (default 80)."),
    checkpoint_every: int = _o(None, "--checkpoint-every", help="Checkpoint every N steps (default: at the end)."),
    keep_last: int = _o(None, "--keep-last", help="Checkpoints kept besides the best (default 3)."),
    device: str = _o(None, "--device", help="auto (default), cpu, cuda, cuda:N, mps."),
    dtype: str = _o(None, "--dtype", help="auto (default), fp32, bf16, fp16."),
    compile: bool = _o(None, "--compile/--no-compile", help="Compile the model with torch.compile."),
    threads: int = _o(None, "--threads", help="Torch CPU threads (default: all cores)."),
    seed: int = _o(None, "--seed", help="Random seed (default 1337)."),
    out: str = _o(None, "--out", "-o", help="Run directory (default runs/<timestamp>)."),
    resume: str = _o(None, "--resume", help="Run directory or checkpoint to continue."),
    init: str = _o(None, "--init", help="Start from a checkpoint's or GPT-2's weights."),
    spike_factor: float = _o(None, "--spike-factor", help="Pause/stop when loss exceeds this x its recent mean (0: off)."),
    max_bad_steps: int = _o(None, "--max-bad-steps", help="Non-finite steps in a row that pause/stop (default 3)."),
    fsdp: bool = _o(None, "--fsdp/--no-fsdp", help="Shard the model with FSDP under torchrun."),
    log: list[str] = _o(None, "--log", help="Also log to tensorboard (RUN/tensorboard) or wandb (RUN/wandb); repeatable. Default: metrics.jsonl only."),
    config: str = _o(None, "--config", help="TOML file of settings (flags override it)."),
    headless: bool = _o(False, "--headless", help="No dashboard: progress lines on stdout."),
    detach: bool = _o(False, "--detach", help="Run in the background; attach with `gpt-tui attach RUN_DIR`."),
) -> None:
    """Train a GPT. Opens the dashboard in a terminal, else runs headless."""
    flags = {k: v for k, v in locals().items() if k not in ("config", "headless", "detach")}
    cfg = config_from_flags(flags, config)
    if not cfg.data and cfg.epochs is None and cfg.max_steps is None:
        cfg.epochs = 3  # the embedded demo: about a minute on a 2-core CPU
    run_training(cfg, headless=headless, detach=detach)


def run_training(cfg: Any, headless: bool = False, detach: bool = False, trainer_cls: Any = None) -> None:
    """Start a run with the dashboard, headless, or detached, and exit with its status."""
    from engine.trainer import Trainer

    trainer_cls = trainer_cls or Trainer
    from .control import refuse_live_run

    refuse_live_run(cfg)  # one process per run directory
    if detach:
        from .detach import detach_run

        detach_run(sys.argv, cfg)
        return
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not headless and not distributed and not has_terminal():
        print("gpt-tui: no terminal to draw on; running headless", file=sys.stderr)
        headless = True
    if headless or distributed:
        run_headless(cfg, trainer_cls)
    else:
        from .app import run_dashboard

        run_dashboard(cfg, trainer_cls)


def run_headless(cfg: Any, trainer_cls: Any) -> None:
    from engine.errors import DivergenceError

    from .headless import ConsoleSink

    trainer = trainer_cls(cfg, ConsoleSink(), with_ui=False)
    trainer.progress = _tokenize_progress()
    with SignalStopper(lambda: trainer.stop(save=True)):
        trainer.setup()
        _serve_control(trainer)
        try:
            state = trainer.fit()
        except DivergenceError as e:
            fail(str(e), 3)
    if state == "stopped":
        raise typer.Exit(0)


def _serve_control(trainer: Any) -> None:
    """Open the run's control channel (attach, pause/resume/checkpoint/stop from a shell)."""
    try:
        from .control import serve_control
    except ImportError:
        return
    serve_control(trainer)


def _tokenize_progress():
    state = {"last": 0.0}

    def progress(done: int, total: int) -> None:
        import time

        now = time.time()
        if done < total and now - state["last"] < 0.5:
            return
        state["last"] = now
        if total > 4 << 20 or state.get("shown"):
            state["shown"] = True
            width = 30
            filled = int(width * done / max(1, total))
            end = "\n" if done >= total else "\r"
            print(f"tokenizing [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:.1f}/{total / 2**20:.1f} MB",
                  end=end, file=sys.stderr, flush=True)

    return progress


@app.command()
@friendly_errors
def generate(
    source: str = typer.Argument(..., help="Run directory or checkpoint file."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue ('-' reads stdin)."),
    max_new_tokens: int = typer.Option(100, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 is greedy."),
    top_k: int = typer.Option(50, "--top-k", help="Keep the k most likely tokens (0: all)."),
    top_p: float = typer.Option(None, "--top-p", help="Nucleus sampling mass (e.g. 0.9)."),
    seed: int = typer.Option(None, "--seed", help="Same seed, same output."),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole context each token."),
    no_stop: bool = typer.Option(False, "--no-stop", help="Do not stop at end-of-text."),
    raw: bool = typer.Option(False, "--raw", help="Do not apply an instruction template."),
    no_echo: bool = typer.Option(False, "--no-echo", help="Write only the continuation, not the prompt before it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, mps."),
) -> None:
    """Generate text from a checkpoint: the prompt, then its continuation (only text goes to stdout).

    Instruction-tuned checkpoints print only the response (the prompt goes through their template);
    --no-echo prints only the continuation for any checkpoint.
    """
    from engine.inference import load_for_inference
    from engine.sampling import SampleSettings

    if prompt == "-":
        prompt = sys.stdin.read()
    if max_new_tokens <= 0:
        fail(f"--max-new-tokens must be positive, got {max_new_tokens}: give a value above 0")
    if temperature < 0:
        fail(f"--temperature must not be negative, got {temperature}: use 0 for greedy")
    lm = load_for_inference(source, device)
    settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                              top_p=top_p, seed=seed, stop_at_eot=not no_stop, use_cache=not no_kv_cache)
    text_prompt = prompt if raw else lm.format_prompt(prompt)
    truncated = lm.truncation_note(text_prompt)
    if truncated:
        print(f"gpt-tui: {truncated}", file=sys.stderr)
    echo = not no_echo and text_prompt == prompt
    try:
        if echo:
            sys.stdout.write(prompt)
        for piece in lm.stream(text_prompt, settings):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except BrokenPipeError:
        return
    sys.stdout.write("\n")


# Commands that live in their own modules.
from . import cmd_dist, cmd_gpt2, cmd_logs, cmd_prepare, cmd_runs, cmd_sample, cmd_speed  # noqa: E402

for _m in (cmd_gpt2, cmd_sample, cmd_speed, cmd_dist, cmd_prepare, cmd_runs, cmd_logs):
    _m.register(app)


def main() -> None:
    """Entry point: usage errors (unknown flag, bad value) as one line, like every other error."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        code = e.exit_code
    except UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "gpt-tui"
        print(f"gpt-tui: error: {e.format_message().rstrip('.')}: see `{cmd} --help`", file=sys.stderr)
        code = e.exit_code
    except ClickException as e:
        print(f"gpt-tui: error: {e.format_message()}", file=sys.stderr)
        code = e.exit_code
    except typer.Abort:
        print("gpt-tui: aborted", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
