"""Generation in batches: one function for the eval report and the Serve replicas, so that a model
is scored exactly as it answers when served.

Prompts of different lengths share a batch by left padding (the attention mask hides the pads,
and generate() derives each row's positions from the mask), so a batch gives each prompt the
greedy answer it gets alone. Each row has its own `Decoding`: greedy, or sampled from its own
torch.Generator (seeded: the same answer on every call, alone or in a batch), its own token budget
and stop strings; a row that is done (its budget, EOS, a stop string, or cancelled by its caller)
stops generating at that step while the others go on.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

STOP, LENGTH, CUT_OFF = "stop", "length", "cut_off"  # how an answer ended (request_log.finish_reason)
MIN_TEMPERATURE = 1e-6  # a lower sampling temperature is taken as this one (still all but greedy)


@dataclass(frozen=True)
class Decoding:
    """How one row is decoded. temperature 0: greedy (top_p and seed unused)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed for a sampled row
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings


@dataclass(frozen=True)
class Answer:
    text: str  # decoded without special tokens, cut before a stop string
    tokens: int  # tokens generated (EOS included)
    finish_reason: str  # STOP (EOS or a stop string), LENGTH (budget spent) or CUT_OFF (cancelled)


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` led by BOS when the tokenizer has one, unless the text brought it (a chat template
    that writes {{ bos_token }})."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def prompt_ids(tokenizer, text: str, seq_len: int) -> list[int]:
    """The token ids a prompt is answered from: BOS (when the tokenizer has one) and the text,
    cut from the left to leave room for one generated token within `seq_len`."""
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])[-(seq_len - 1):]


def greedy_batch(model, tokenizer, ids: list[list[int]], max_new_tokens: list[int]) -> list[str]:
    """Greedy answers to a batch of prompts (token ids), each cut at its own token budget."""
    return [answer.text for answer in
            generate_batch(model, tokenizer, ids, [Decoding(budget) for budget in max_new_tokens])]


def generate_batch(model, tokenizer, ids: list[list[int]], decodings: list[Decoding],
                   on_text: Callable[[int, str], None] | None = None,
                   cancelled: Callable[[int], bool] | None = None) -> list[Answer]:
    """Answers to a batch of prompts (token ids), row i decoded by decodings[i]. After each step,
    `on_text(i, text_so_far)` for every row still generating (its text cut before a stop string),
    and `cancelled(i)` ends row i at once (CUT_OFF)."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    rows = _Rows(tokenizer, width, decodings, on_text, cancelled)
    sampled = any(d.temperature > 0 for d in decodings)
    processors = LogitsProcessorList([_Sampler(decodings)] if sampled else [])
    with torch.inference_mode():
        # do_sample=False: the argmax of each row's scores; a sampled row's scores are set by
        # _Sampler to its drawn token alone, so greedy rows are exactly generate()'s greedy.
        model.generate(input_ids, attention_mask=attention,
                       max_new_tokens=max(d.max_new_tokens for d in decodings),
                       do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad,
                       logits_processor=processors, stopping_criteria=StoppingCriteriaList([rows]))
    return [answer or rows.answer(i, LENGTH) for i, answer in enumerate(rows.answers)]


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """`text` before the first stop string in it, and whether there was one."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class _Rows:
    """The stopping criterion that follows each row: its text, budget, stop strings and cancel
    flag; generate() ORs the per-row flags it returns into the rows that keep going."""

    def __init__(self, tokenizer, width: int, decodings: list[Decoding], on_text, cancelled):
        self.tokenizer, self.width, self.decodings = tokenizer, width, decodings
        self.on_text, self.cancelled = on_text, cancelled
        self.answers: list[Answer | None] = [None] * len(decodings)
        self.generated: list[list[int]] = [[] for _ in decodings]

    def answer(self, i: int, finish_reason: str) -> Answer:
        text = self.tokenizer.decode(self.generated[i], skip_special_tokens=True)
        return Answer(_cut_at_stop(text, self.decodings[i].stop)[0], len(self.generated[i]), finish_reason)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i, decoding in enumerate(self.decodings):
            if self.answers[i] is not None:
                done[i] = True
                continue
            token = int(input_ids[i, -1])
            self.generated[i].append(token)
            text = self.tokenizer.decode(self.generated[i], skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, decoding.stop)
            if token == self.tokenizer.eos_token_id or stopped:
                reason = STOP
            elif len(self.generated[i]) >= decoding.max_new_tokens:
                reason = LENGTH
            elif self.cancelled is not None and self.cancelled(i):
                reason = CUT_OFF
            else:
                reason = None
            if self.on_text is not None and reason != CUT_OFF:
                self.on_text(i, text)
            if reason is not None:
                self.answers[i] = Answer(text, len(self.generated[i]), reason)
                done[i] = True
        return done


class _Sampler:
    """Draws each sampled row's next token from its own generator (temperature, then nucleus
    top_p), and leaves that token alone in the row's scores; greedy rows are untouched."""

    def __init__(self, decodings: list[Decoding]):
        import torch

        self.rows = [(i, d, torch.Generator().manual_seed(d.seed if d.seed is not None else
                                                          random.SystemRandom().getrandbits(63)))
                     for i, d in enumerate(decodings) if d.temperature > 0]

    def __call__(self, input_ids, scores):
        import torch

        for i, decoding, generator in self.rows:
            # In float64, the temperature at least MIN_TEMPERATURE: logits over a tiny temperature
            # would overflow float32 to inf, and softmax(inf - inf) is NaN.
            probs = torch.softmax(scores[i].double() / max(decoding.temperature, MIN_TEMPERATURE), dim=-1)
            if decoding.top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                # Keep the most likely tokens whose mass before them is under top_p (at least one).
                drop = (torch.cumsum(ordered, dim=-1) - ordered) >= decoding.top_p
                ordered[drop] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, ordered)
            token = torch.multinomial(probs, 1, generator=generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores
