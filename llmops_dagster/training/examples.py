"""Prompt-set records as training tensors: token ids with the prompt masked out of the loss, the
order each rank sees them in, and the mean token loss of a model on them."""

from __future__ import annotations

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss on them


def encode_examples(path: str, tokenizer, seq_len: int):
    """Token ids, attention mask and labels (prompt and padding masked) for a prompt-set file,
    read with `datasets.load_dataset("json")` and the prompt set's schema: inferred per 10 MB block,
    feedback_id (null on every trusted row) would fail to cast between blocks. The Arrow copy
    `datasets` prepares goes to a temporary folder removed at once (records kept in memory): in its
    shared cache (~/.cache/huggingface) a purged correction's text would outlive the purge."""
    import tempfile

    from datasets import load_dataset

    from llmops_dagster.prompts.templates import record_features

    with tempfile.TemporaryDirectory(prefix="llmops-records-") as cache:
        records = load_dataset("json", data_files=path, split="train", features=record_features(),
                               cache_dir=cache, keep_in_memory=True)
        return encode_records(records, tokenizer, seq_len)


def encode_records(records, tokenizer, seq_len: int):
    """The same for prompt-set records; only their prompt and completion are read."""
    import torch

    ids = torch.full((len(records), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(records), seq_len), IGNORE_INDEX, dtype=torch.long)
    from llmops_dagster.generation import with_bos

    for row, record in enumerate(records):
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        answer = (answer + [tokenizer.eos_token_id])[: seq_len // 2]
        # Too long: drop the start of the prompt (the question and "Assistant:" cue are at its end),
        # so that every example keeps answer tokens to learn from.
        prompt = with_bos(tokenizer, prompt)[-(seq_len - len(answer)):]
        tokens = prompt + answer
        ids[row, : len(tokens)] = torch.tensor(tokens)
        labels[row, len(prompt) : len(tokens)] = torch.tensor(answer)
    mask = (torch.arange(seq_len)[None, :] < (ids != tokenizer.pad_token_id).sum(1, keepdim=True))
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def sampling_weights(path: str, feedback_weight: int) -> list[int]:
    """Draws per epoch of each record of a prompt-set file: `feedback_weight` for a record made
    from an accepted correction (a feedback_id), 1 for the rest."""
    from llmops_dagster.prompts.templates import read_records

    return [feedback_weight if record.get("feedback_id") is not None else 1
            for record in read_records(path)]


class BatchOrder:
    """Which examples each rank sees at each micro-batch: a fresh seeded permutation an epoch, so a
    resumed run sees exactly the batches the uninterrupted run would have seen. With `weights`,
    example i appears weights[i] times in an epoch (its draws are spread by the permutation)."""

    def __init__(self, n_examples: int, micro_batch: int, world_size: int, seed: int,
                 weights: list[int] | None = None):
        if weights is not None and len(weights) != n_examples:
            raise ValueError(f"weights: {len(weights)} for {n_examples} examples")
        self.pool = ([i for i, weight in enumerate(weights) for _ in range(weight)]
                     if weights is not None else list(range(n_examples)))
        self.n, self.micro, self.world, self.seed = len(self.pool), micro_batch, world_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = [self.pool[i] for i in torch.randperm(self.n, generator=generator).tolist()]
        return self._perms[epoch]

    def indices(self, micro_step: int, rank: int) -> list[int]:
        start = (micro_step * self.world + rank) * self.micro
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.micro)]


def evaluate_loss(model, data: dict, batch_size: int = 32) -> float:
    """Mean token loss of `model` on encoded examples (no gradients)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data["input_ids"]), batch_size):
            batch = {k: v[start : start + batch_size] for k, v in data.items()}
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    model.train()
    return total / max(count, 1)
