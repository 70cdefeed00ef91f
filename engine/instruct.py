"""Instruction finetuning on Alpaca-format records (LLMs-from-scratch chapter 7).

* Records are JSON objects with ``instruction``, ``output`` and (optionally empty) ``input``;
  a file is a JSON list of them (the book's ``instruction-data.json``, the 52k
  ``alpaca_data.json``) or JSON Lines.
* Each record becomes the Alpaca prompt (:func:`engine.prompts.alpaca_prompt`) followed by the
  response and one end-of-text token.
* Split as in the book, in file order: the first 85% train, the next 10% test, the last 5%
  validation (1,100 records -> 935 / 110 / 55).
* :func:`collate` pads each batch to its longest example with end-of-text (50256); the targets
  are the inputs shifted by one, with -100 (ignored by the loss) on the padding after the first
  end-of-text and, by default, on the prompt tokens; ``max_length`` cuts long examples.
* :class:`InstructTask` is the task the :class:`engine.trainer.Trainer` runs with this data:
  samples that answer a few fixed validation instructions beside their expected output, an
  ``alpaca`` template recorded in every checkpoint, test-split responses written after the final
  checkpoint; LoRA adapters come from the strategy (:class:`engine.strategy.LoRAStrategy`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import checkpoint as ck
from .errors import DataError, GptTuiError
from .events import SampleEvent
from .prompts import alpaca_prompt
from .sampling import SampleSettings, generate_batch
from .task import TaskData
from .tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_spec

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .config import TrainConfig
    from .trainer import Trainer

IGNORE_INDEX = -100
PAD_ID = 50256  # GPT-2's <|endoftext|>
SPLIT = (0.85, 0.10)  # train, test; validation gets the rest (5%)
N_SAMPLE_RECORDS = 3
TEMPLATE = "alpaca"


# ------------------------------------------------------------------ records
def _parse_file(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist", "give an Alpaca-format JSON file with --data") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text ({e})", "give an Alpaca-format JSON file") from None
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {n} is not valid JSON ({e.msg})", "fix that line") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                        "fix the file (a JSON list of {instruction, input, output} objects)") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records",
                        "give a JSON list of {instruction, input, output} objects")
    return data


def load_records(paths: list[str] | str) -> list[dict[str, str]]:
    """Alpaca records from JSON (list) or JSON Lines files, checked: ``instruction`` and ``output``
    are required strings, ``input`` an optional string."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise DataError("finetuning needs instruction data", "give --data FILE.json (Alpaca format)")
    records: list[dict[str, str]] = []
    for path in paths:
        if os.path.isdir(path):
            raise DataError(f"{path} is a folder", "give the JSON file itself with --data")
        for i, r in enumerate(_parse_file(path)):
            if not isinstance(r, dict):
                raise DataError(f"record {i} of {path} is a {type(r).__name__}, not an object",
                                "each record must be an object with instruction, input and output")
            for key in ("instruction", "output"):
                if key not in r:
                    raise DataError(f"record {i} of {path} has no {key!r} key (keys: {', '.join(map(str, r)) or 'none'})",
                                    "each record needs instruction and output (input may be empty)")
            for key in ("instruction", "input", "output"):
                if key in r and not isinstance(r[key], str):
                    raise DataError(f"record {i} of {path}: {key!r} is a {type(r[key]).__name__}, not text",
                                    "make every instruction, input and output a string")
            records.append({"instruction": r["instruction"], "input": r.get("input", "") or "", "output": r["output"]})
    if not records:
        raise DataError(f"{', '.join(paths)} holds no records", "give a file with Alpaca-format records")
    return records


def split_records(records: list[dict[str, str]]) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, test, val): 85% / 10% / the rest, in file order (the book's split)."""
    n = len(records)
    n_train = int(n * SPLIT[0])
    n_test = int(n * SPLIT[1])
    return records[:n_train], records[n_train:n_train + n_test], records[n_train + n_test:]


def record_prompt(record: dict[str, str]) -> str:
    """The Alpaca prompt of a record, ending with the response header."""
    return alpaca_prompt(record["instruction"], record.get("input", ""))


def encode_records(tok: Tokenizer, records: list[dict[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response, number of prompt tokens) per record.

    The prompt and the response are encoded separately, so the prompt's tokens are exactly
    the first ``n`` ids; special-token text inside a record stays plain text.
    """
    prompts = tok.encode_batch([record_prompt(r) for r in records])
    responses = tok.encode_batch([r["output"] for r in records])
    return [(p + r, len(p)) for p, r in zip(prompts, responses, strict=True)]


def collate(items: list[tuple[list[int], int]], pad_id: int = PAD_ID, max_length: int | None = None,
            mask_prompt: bool = True, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a batch (the book's ``custom_collate_fn`` plus prompt masking).

    Each example gets one end-of-text and is padded with more to the batch's longest example
    plus one; inputs are ``padded[:-1]``, targets ``padded[1:]``. In the targets every
    padding token after the first end-of-text becomes ``ignore_index``, and with
    ``mask_prompt`` so do the prompt's tokens (the first response token is kept). Both are then
    cut to ``max_length``.
    """
    longest = max(len(ids) for ids, _ in items) + 1
    inputs, targets = [], []
    for ids, n_prompt in items:
        padded = ids + [pad_id] * (longest - len(ids))
        x = torch.tensor(padded[:-1], dtype=torch.long)
        y = torch.tensor(padded[1:], dtype=torch.long)
        y[len(ids):] = ignore_index  # y[len(ids) - 1] is the example's own end-of-text
        if mask_prompt and n_prompt > 1:
            y[: n_prompt - 1] = ignore_index
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs), torch.stack(targets)


@dataclass
class _Split:
    """Encoded examples of one split (``n_windows`` mirrors TextData's splits)."""

    items: list[tuple[list[int], int]]
    records: list[dict[str, str]]

    @property
    def n_windows(self) -> int:
        return len(self.items)


class InstructionData:
    """Train / val / test examples with TextData's batching interface (shuffled, resumable order)."""

    def __init__(self, tok: Tokenizer, records: list[dict[str, str]], max_length: int, mask_prompt: bool,
                 seed: int) -> None:
        if tok.eot_id is None:
            raise DataError("instruction finetuning needs a tokenizer with an end-of-text token",
                            "start from a GPT-2 model (gpt-tui import-gpt2) or a gpt2-tokenizer checkpoint")
        self.pad_id = tok.eot_id
        self.max_length = max_length
        self.mask_prompt = mask_prompt
        self.seed = seed
        self.context = max_length
        train, test, val = split_records(records)
        self.dropped = 0
        splits = {}
        for name, recs in (("train", train), ("test", test), ("val", val)):
            items = encode_records(tok, recs) if recs else []
            keep = [i for i, (_, n_prompt) in enumerate(items) if not (mask_prompt and n_prompt >= max_length)]
            self.dropped += len(items) - len(keep)
            splits[name] = _Split([items[i] for i in keep], [recs[i] for i in keep])
        self.train, self.test, self.val = splits["train"], splits["test"], splits["val"]
        for name in ("train", "val"):
            if not splits[name].items:
                raise DataError(
                    f"the {name} split has no usable records ({len(records)} records in all; the split is "
                    f"85% train / 10% test / 5% val)", "give more records (or a larger --max-length)")
        self.n_tokens = sum(min(len(ids) + 1, max_length) for ids, _ in self.train.items)

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled order of training examples in an epoch (a pure function of seed and epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.train.n_windows)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.train.n_windows // global_batch

    def batch(self, split: _Split, ids: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate([split.items[int(i)] for i in ids], self.pad_id, self.max_length, self.mask_prompt)

    def train_batch(self, epoch: int, index: int, batch: int, rank: int = 0, world: int = 1,
                    order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.order(epoch) if order is None else order
        g0 = index * batch * world + rank * batch
        return self.batch(self.train, order[g0:g0 + batch])

    def eval_batches(self, split: str, n_batches: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` batches of a split, in file order (the same every eval)."""
        s = self.train if split == "train" else self.val
        for b in range(n_batches):
            ids = list(range(b * batch, min((b + 1) * batch, s.n_windows)))
            if not ids:
                break
            yield self.batch(s, ids)

    def mean_length(self) -> float:
        return self.n_tokens / max(1, self.train.n_windows)


# ------------------------------------------------------------------ the task
TEST_BATCH = 8
"""Test records answered together (one batch through the KV cache)."""
END_PHASE_SHARE = 0.25
"""By default the test responses stop once they have taken this share of the training time."""
END_PHASE_MIN_S = 20.0
"""... but they may always take this long (a few batches), so a short run still writes some."""


class InstructTask:
    """Instruction finetuning: Alpaca records, samples answering fixed val instructions beside their
    expected output, the template in every checkpoint, and test responses after the final checkpoint."""

    name = "instruct"
    template: str | None = TEMPLATE

    def __init__(self) -> None:
        self.gen_tokens_per_sec: float | None = None  # measured by the samples, for the end phase's ETA

    def setup_data(self, cfg: TrainConfig, resume: Checkpoint | None,
                   progress: Callable[[int, int], None] | None, log: Callable[[str, str], None]) -> TaskData:
        records = load_records(cfg.data)
        if resume is not None:
            tok = tokenizer_from_spec(resume.tokenizer)
            table = int(resume.model_config["context_length"])
        elif cfg.init:
            from .weights import init_model_config, init_tokenizer

            tok = init_tokenizer(cfg.init)
            table = init_model_config(cfg.init).context_length
        else:
            raise GptTuiError("finetuning needs weights to start from", "give --init CHECKPOINT_OR_GPT2_FOLDER")
        if not isinstance(tok, GPT2Tokenizer):
            raise GptTuiError(f"--init {cfg.init} uses the {tok.spec()['type']} tokenizer; the Alpaca data needs GPT-2's",
                              "start from GPT-2 weights or a checkpoint trained with --tokenizer gpt2")
        if cfg.max_length is not None and cfg.max_length > table:
            raise GptTuiError(f"--max-length {cfg.max_length} is longer than the model's position table ({table})",
                              f"use --max-length {table} or less")
        context = cfg.max_length or table
        data = InstructionData(tok, records, context, cfg.mask_prompt, cfg.seed)
        if data.dropped:
            log(f"{data.dropped} record(s) dropped: their prompt alone fills --max-length {context}", "warning")
        return TaskData(tok, data, context)

    def tokens_per_step(self, trainer: Trainer) -> int:
        """Approximate: the mean example length (the batches are padded per batch)."""
        cfg = trainer.cfg
        return int(cfg.batch_size * cfg.grad_accum * trainer.world * trainer.data.mean_length())

    def checkpoint_extra(self, trainer: Trainer) -> dict[str, Any]:
        d = trainer.data
        return {"template": TEMPLATE, "mask_prompt": trainer.cfg.mask_prompt, "max_length": trainer.context,
                "split": {"train": d.train.n_windows, "test": d.test.n_windows, "val": d.val.n_windows}}

    def respond(self, trainer: Trainer, records: list[dict[str, str]], max_new_tokens: int,
                should_stop: Callable[[], bool] | None = None) -> list[str]:
        """The live model's greedy responses to records, generated together (KV cache, stop at end-of-text)."""
        tok, model = trainer.tokenizer, trainer.model
        ctx = model.cfg.context_length
        prompts = [tok.encode(record_prompt(r))[-(ctx - 1):] for r in records]
        settings = SampleSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_k=None, seed=trainer.cfg.seed)
        t0 = time.perf_counter()
        out = generate_batch(model, prompts, settings, tok.eot_id, should_stop, trainer.autocast)
        n = sum(len(o) for o in out)
        if n:
            self.gen_tokens_per_sec = n / max(1e-9, time.perf_counter() - t0)
        return [tok.decode(o).strip() for o in out]

    def samples(self, trainer: Trainer) -> None:
        """Responses to the first few validation instructions, each beside its expected output."""
        records = trainer.data.val.records[:N_SAMPLE_RECORDS]
        for record, text in zip(records, self.respond(trainer, records, trainer.cfg.sample_tokens), strict=True):
            shown = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
            trainer.emit(SampleEvent(step=trainer.step, epoch=trainer.epoch_of_step(trainer.step), text=text,
                                     prompt=shown, expected=record["output"]))

    def _planned(self, trainer: Trainer) -> list[dict[str, str]]:
        limit = trainer.cfg.test_responses
        records = trainer.data.test.records
        return records if limit is None else records[:limit]

    def end_phase_seconds(self, trainer: Trainer) -> float:
        """Upper estimate from the samples' generation speed: every planned record at full length,
        or (without --test-responses) the time budget plus the batch that may overrun it."""
        n = len(self._planned(trainer))
        if not n or not self.gen_tokens_per_sec:
            return 0.0
        # a batch of TEST_BATCH runs about as fast per step as one sample: tokens/s scale with the batch
        per_batch = trainer.cfg.sample_tokens / (self.gen_tokens_per_sec * min(TEST_BATCH, n) / N_SAMPLE_RECORDS)
        estimate = per_batch * math.ceil(n / TEST_BATCH)
        if trainer.cfg.test_responses is None and trainer.step:
            projected = trainer.train_seconds / trainer.step * trainer.total_steps
            estimate = min(estimate, self.budget(projected) + per_batch)
        return estimate

    @staticmethod
    def budget(train_seconds: float) -> float:
        """How long the default end phase may answer: a quarter of the training time, at least 20 s."""
        return max(END_PHASE_MIN_S, END_PHASE_SHARE * train_seconds)

    def end_phase(self, trainer: Trainer) -> None:
        """Write responses to the test split into RUN/test_responses.json, batch by batch.

        The file is rewritten after each batch, so a stop (the first Ctrl+C) keeps what is done.
        Without ``--test-responses`` the phase ends once it has taken a quarter of the training
        time (at least 20 s), so a short run does not wait long on its end.
        """
        records = self._planned(trainer)
        if not records:
            return
        budget = self.budget(trainer.train_seconds) if trainer.cfg.test_responses is None else None
        trainer.set_state("finishing", f"answering {len(records)} test records")
        path = os.path.join(trainer.run_dir, "test_responses.json")
        done: list[dict[str, str]] = []
        t0 = time.perf_counter()
        for i in range(0, len(records), TEST_BATCH):
            if trainer.stopping or (budget is not None and done and time.perf_counter() - t0 > budget):
                break
            batch = records[i:i + TEST_BATCH]
            texts = self.respond(trainer, batch, trainer.cfg.sample_tokens, lambda: trainer.stopping)
            if trainer.stopping:
                break
            done += [dict(r, model_response=t) for r, t in zip(batch, texts, strict=True)]
            ck.write_json_atomic(path, done)
            el = time.perf_counter() - t0
            eta = el / len(done) * (len(records) - len(done))
            if budget is not None and len(done) < len(records):  # a batch starts only within the budget
                eta = 0.0 if el > budget else min(eta, budget - el + el / math.ceil(len(done) / TEST_BATCH))
            trainer.log(f"test responses {len(done)}/{len(records)} · ETA {eta:.0f}s", "progress")
        if done:
            rest = len(records) - len(done)
            more = (f"; {rest} left ({'stopped' if trainer.stopping else 'time budget'}: --test-responses "
                    f"{len(records)} answers all)") if rest else ""
            trainer.log(f"wrote {len(done)} test responses to {path}{more}")
