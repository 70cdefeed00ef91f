"""``gpt-tui export --format hf``: a Hugging Face GPT-2 folder (see :mod:`engine.hf_export`)."""

from __future__ import annotations

FORMATS = ("gpt-tui", "hf")


def export_hf_command(source: str, out: str) -> None:
    """Write ``source`` (run or checkpoint; LoRA merged) as a Hugging Face folder and say what was written."""
    from engine.hf_export import export_hf

    r = export_hf(source, out)
    what = "merged LoRA adapters and exported" if r.merged_lora else "exported"
    tok = "GPT-2 BPE" if r.tokenizer == "gpt2" else "char-level"
    print(f"{what} {r.n_params:,} parameters as a Hugging Face GPT-2 model ({tok} tokenizer) -> {r.out}: "
          f"{', '.join(r.files)}")
