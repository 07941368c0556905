"""Greedy generation in batches: one function for the eval report and the Serve replicas, so that
a model is scored exactly as it answers when served.

Prompts of different lengths share a batch by left padding (the attention mask hides the pads,
and generate() derives each row's positions from the mask), so a batch gives each prompt the
greedy answer it gets alone.
"""

from __future__ import annotations


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
    import torch

    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    attention = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=attention, max_new_tokens=max(max_new_tokens),
                                do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    return [tokenizer.decode(row[width: width + budget], skip_special_tokens=True)
            for row, budget in zip(output, max_new_tokens, strict=True)]
