"""Load a checkpoint for generation (no training state) and stream text from it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import checkpoint as ck
from .device import autocast_factory, resolve_device
from .errors import GptTuiError
from .model import GPT, ModelConfig
from .sampling import SampleSettings, generate_stream
from .tokenizer import CharTokenizer, Tokenizer, tokenizer_from_spec

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt template of LLMs-from-scratch ch07, ending with the response header."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + "\n\n### Response:\n"


@dataclass
class LoadedModel:
    """A model ready to sample from."""

    model: GPT
    tokenizer: Tokenizer
    device: torch.device
    path: str
    meta: dict = field(default_factory=dict)
    template: str | None = None  # "alpaca" for instruction-tuned checkpoints
    step: int = 0

    def format_prompt(self, prompt: str) -> str:
        if self.template == "alpaca":
            return alpaca_prompt(prompt)
        return prompt

    def check_prompt(self, prompt: str) -> list[int]:
        if not prompt:
            raise GptTuiError("the prompt is empty", "type some text to start from")
        if isinstance(self.tokenizer, CharTokenizer):
            bad = self.tokenizer.unknown(prompt)
            if bad:
                raise GptTuiError(
                    f"prompt has character(s) outside the model's char vocabulary: {' '.join(repr(c) for c in bad[:10])}",
                    "use only characters from the training corpus",
                )
        return self.tokenizer.encode(prompt)

    def truncation_note(self, prompt: str) -> str | None:
        n = len(self.check_prompt(prompt))
        ctx = self.model.cfg.context_length
        if n >= ctx:
            return f"prompt has {n} tokens, the context is {ctx}: using its last {ctx - 1} tokens"
        return None

    def stream(self, prompt: str, settings: SampleSettings, should_stop: Callable[[], bool] | None = None,
               stats: dict | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are generated (multi-byte characters kept whole)."""
        ids = self.check_prompt(prompt)
        ctx = self.model.cfg.context_length
        ids = ids[-(ctx - 1):] if len(ids) >= ctx else ids
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        eot = self.tokenizer.eot_id
        out: list[int] = []
        emitted = ""
        t0 = time.perf_counter()
        for nxt in generate_stream(self.model, idx, settings, eot, should_stop, self.autocast):
            t = int(nxt[0])
            if eot is not None and t == eot and settings.stop_at_eot:
                break
            out.append(t)
            if stats is not None:
                stats["tokens"] = len(out)
                stats["tokens_per_sec"] = len(out) / max(1e-9, time.perf_counter() - t0)
            text = self.tokenizer.decode(out)
            if not text.endswith("\ufffd"):
                yield text[len(emitted):]
                emitted = text
        text = self.tokenizer.decode(out)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def generate(self, prompt: str, settings: SampleSettings) -> str:
        return "".join(self.stream(prompt, settings))

    @property
    def autocast(self):
        return autocast_factory(self.device, "fp32")


def model_from_checkpoint(obj: dict) -> GPT:
    """Rebuild the model of a loaded checkpoint (full weights, or base + LoRA adapters)."""
    if obj.get("kind") == "lora":
        from .lora import model_from_lora_checkpoint

        return model_from_lora_checkpoint(obj)
    model = GPT(ModelConfig.from_dict(obj["model_config"]))
    from .model import describe_shape_mismatch

    diff = describe_shape_mismatch(model, obj["model"])
    if diff:
        raise GptTuiError(f"checkpoint {obj.get('_path')} does not fit its model config ({'; '.join(diff[:3])})",
                          "the file is damaged; use another checkpoint")
    model.load_state_dict(obj["model"])
    return model


def load_for_inference(source: str, device: str = "auto") -> LoadedModel:
    dev = resolve_device(device)
    obj = ck.load_checkpoint(source)
    model = model_from_checkpoint(obj).to(dev).eval()
    tok = tokenizer_from_spec(obj["tokenizer"])
    extra = obj.get("extra") or {}
    return LoadedModel(model=model, tokenizer=tok, device=dev, path=obj["_path"], meta=obj.get("_meta", {}),
                       template=extra.get("template"), step=int(obj.get("step", 0)))
