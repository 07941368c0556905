"""The preference step: Direct Preference Optimization (Rafailov et al., 2023) on the pairs of a
preference set, after the supervised steps of a fine-tune, in the same DeepSpeed engine.

Why our own loss and not TRL's DPOTrainer: TRL's trainers drive their own loop (Hugging Face
Trainer and Accelerate), which would replace what our launcher gives every fine-tune: torchrun
ranks on one or several nodes, checkpoints published only when complete, resume mid-run, metrics
and progress through Dagster Pipes. The loss itself is a few lines (below), checked against the
paper's formula in tests/test_preferences.py.

The reference model is the policy as the supervised steps left it: each pair's reference
log-probabilities are computed once, when the step begins, and kept in the fine-tune's folder, so
a run resumed mid-step uses the same reference. Loss, with pi the policy's and ref the reference's
summed log-probability of an answer's tokens (nats) and beta the strength of the KL anchor:

    loss = -log sigmoid(beta * ((pi(chosen) - ref(chosen)) - (pi(rejected) - ref(rejected))))
"""

from __future__ import annotations

from pathlib import Path

from llmops_dagster.training.examples import IGNORE_INDEX, encode_records

REFERENCE_FILE = "preference_reference.pt"


def encode_pairs(pairs: list[dict], tokenizer, seq_len: int) -> tuple[dict, dict]:
    """Token tensors of the chosen and of the rejected answers, each after its pair's prompt."""
    chosen = encode_records([{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
                            tokenizer, seq_len)
    rejected = encode_records([{"prompt": p["prompt"], "completion": p["rejected"]} for p in pairs],
                              tokenizer, seq_len)
    return chosen, rejected


def sequence_logps(model, batch: dict):
    """Summed log-probability (nats) of each row's answer tokens (labels not IGNORE_INDEX)."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """(mean DPO loss, share of pairs whose implicit reward prefers the chosen answer)."""
    import torch.nn.functional as F

    margin = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def reference_logps(model, chosen: dict, rejected: dict, folder: Path, device, batch_size: int = 16):
    """Each pair's reference log-probabilities (chosen, rejected): read from `folder` when a run
    before this one computed them, else computed now with `model` (no gradient) and saved."""
    import torch

    path = folder / REFERENCE_FILE
    if path.exists():
        saved = torch.load(path, weights_only=True)  # tensors only: no pickled code runs
        return saved["chosen"], saved["rejected"]
    out = {}
    with torch.no_grad():
        for name, data in (("chosen", chosen), ("rejected", rejected)):
            parts = []
            for start in range(0, len(data["input_ids"]), batch_size):
                batch = {k: v[start:start + batch_size].to(device) for k, v in data.items()}
                parts.append(sequence_logps(model, batch).cpu())
            out[name] = torch.cat(parts)
    return out["chosen"], out["rejected"]


def save_reference(chosen, rejected, folder: Path) -> None:
    """Keep the reference log-probabilities beside the fine-tune (rank 0, atomically)."""
    import torch

    staging = folder / f".{REFERENCE_FILE}.tmp"
    torch.save({"chosen": chosen, "rejected": rejected}, staging)
    staging.replace(folder / REFERENCE_FILE)
