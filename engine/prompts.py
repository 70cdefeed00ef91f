"""Instruction prompt templates: the text a model finetuned on instructions expects around a request."""

from __future__ import annotations

from collections.abc import Callable

from .errors import GptTuiError

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt template of LLMs-from-scratch ch07, ending with the response header."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        text += f"\n\n### Input:\n{input_text}"
    return text + "\n\n### Response:\n"


TEMPLATES: dict[str, Callable[..., str]] = {"alpaca": alpaca_prompt}
"""Templates by the name a checkpoint records (``extra.template``)."""


def format_prompt(template: str | None, prompt: str) -> str:
    """``prompt`` inside ``template`` (None: as it is)."""
    if template is None:
        return prompt
    if template not in TEMPLATES:
        raise GptTuiError(f"unknown prompt template {template!r}", f"use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template](prompt)
