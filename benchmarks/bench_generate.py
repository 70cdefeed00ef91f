"""Generation speed: KV-cached decoding against full recomputation, side by side.

For each preset (random weights, GPT-2 vocabulary) the same prompt is continued greedily
for ``--new`` tokens twice: with :func:`engine.sampling.generate` (the KV cache: the prompt
once, then one position per token) and with the book's ``generate_text_simple`` (the whole
context recomputed for every token). Both must pick the same tokens; the script prints
tokens/sec of each and their ratio, and where a cached token's time goes (the transformer
blocks against the output layer, measured on their own). On CPU it also runs the cached
decoding with the LM head applied as the plain ``nn.Linear`` instead of the transposed
copy generation uses, to show what that layout is worth.

    python benchmarks/bench_generate.py                              # small and gpt2, 200 new tokens
    python benchmarks/bench_generate.py --presets gpt2 --prompt-len 200 --threads 2
    python benchmarks/bench_generate.py --device cuda --presets gpt2,gpt2-medium

The ratio grows with the context: recomputation costs grow with the text's length, the
cache's cost per token hardly does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import sampling  # noqa: E402
from engine.model import GPT, KVCache, preset_config  # noqa: E402
from engine.sampling import SampleSettings, generate, generate_text_simple  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def token_breakdown(model: GPT, prompt: torch.Tensor, device: torch.device, n: int = 10) -> tuple[float, float]:
    """Seconds per cached token spent in the blocks (with embeddings) and in the output layer."""
    cache = KVCache(model.cfg, 1, model.cfg.context_length)
    model.hidden(prompt, cache)
    last = prompt[:, -1:]
    model.hidden(last, cache)  # warm-up
    t_blocks, h = timed(lambda: [model.hidden(last, cache) for _ in range(n)][-1], device)
    head = sampling.next_logits_fn(model, 1 << 30)
    t_head, _ = timed(lambda: [head(h[:, -1]) for _ in range(n)], device)
    return t_blocks / n, t_head / n


def cached_generate(model: GPT, prompt: torch.Tensor, settings: SampleSettings, transposed: bool) -> torch.Tensor:
    sampling.TRANSPOSED_HEAD_ON_CPU = transposed
    try:
        return generate(model, prompt, settings)
    finally:
        sampling.TRANSPOSED_HEAD_ON_CPU = True


def bench(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPT(preset_config(preset, vocab_size=50257, dropout=0.0)).to(device).eval()
    ctx = model.cfg.context_length
    if args.prompt_len + args.new > ctx:
        sys.exit(f"{preset}: --prompt-len {args.prompt_len} + --new {args.new} is over its context {ctx}")
    prompt = torch.randint(0, 50257, (1, args.prompt_len), device=device)
    greedy = SampleSettings(max_new_tokens=args.new, temperature=0.0, stop_at_eot=False)
    generate(model, prompt, SampleSettings(max_new_tokens=3, temperature=0.0))  # warm-up
    times: dict[str, list[float]] = {"cached": [], "plain_head": [], "recompute": []}
    for _ in range(args.repeats):  # interleaved, so a busy machine slows all alike
        t, cached = timed(lambda: cached_generate(model, prompt, greedy, True), device)
        times["cached"].append(t)
        t, plain = timed(lambda: cached_generate(model, prompt, greedy, False), device)
        times["plain_head"].append(t)
        t, simple = timed(lambda: generate_text_simple(model, prompt, args.new, ctx), device)
        times["recompute"].append(t)
    sampling.TRANSPOSED_HEAD_ON_CPU = False
    blocks, head = token_breakdown(model, prompt, device)
    sampling.TRANSPOSED_HEAD_ON_CPU = True
    tps = {k: args.new / min(v) for k, v in times.items()}
    return {
        "preset": preset,
        "params": model.num_params() / 1e6,
        **tps,
        "same": bool(torch.equal(cached, simple) and torch.equal(plain, simple)),
        "head_share": head / (blocks + head),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="small,gpt2", help="comma list of presets")
    p.add_argument("--new", type=int, default=200, help="new tokens per generation")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    p.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
          f"greedy, prompt {args.prompt_len} tokens, {args.new} new tokens, best of {args.repeats}")
    print(f"{'preset':<8} {'params':>8} {'cached tok/s':>13} {'recompute tok/s':>16} {'ratio':>7} "
          f"{'same tokens':>12} {'head share':>11} {'plain-head tok/s':>17} {'head speed-up':>14}")
    for preset in args.presets.split(","):
        r = bench(preset.strip(), args, device)
        print(f"{r['preset']:<8} {r['params']:>7.1f}M {r['cached']:>13.1f} {r['recompute']:>16.1f} "
              f"{r['cached'] / r['recompute']:>6.1f}x {'yes' if r['same'] else 'NO':>12} {r['head_share']:>10.0%} "
              f"{r['plain_head']:>17.1f} {r['cached'] / r['plain_head']:>13.2f}x", flush=True)
    print("ratio: cached over recompute tokens/sec. head share: the output layer's part of a cached token with "
          "the plain nn.Linear head; plain-head: cached decoding with that head instead of the transposed copy "
          "(engine.sampling.next_logits_fn) used on CPU")

if __name__ == "__main__":
    main()
