#!/usr/bin/env bash
# The README's GPU recipe (a 125M-parameter Llama built from config, bf16, DeepSpeed ZeRO 2, one rank
# a GPU) through the fine-tune asset for a fixed number of steps; prints tokens/s and MFU.
#
#   benchmarks/gpu_check.sh [STEPS]     STEPS: optimizer steps (default 500, the recipe's)
#
# Needs an NVIDIA GPU (exit 2 without one). Creates .venv with `make` when it is missing. MFU needs the
# GPU's dense bf16 peak: known for the models below, else set PEAK_TFLOPS_PER_GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-500}"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists none); this check needs one" >&2
  exit 2
fi
GPUS=$(nvidia-smi -L | grep -c '^GPU ')
NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
case "$NAME" in  # dense bf16 TFLOP/s of one GPU (datasheets, SXM; no sparsity)
  *H100*|*H200*) PEAK=989 ;;
  *A100*) PEAK=312 ;;
  *L40S*) PEAK=362 ;;
  *L4*) PEAK=121 ;;
  *) PEAK="" ;;
esac
PEAK="${PEAK_TFLOPS_PER_GPU:-$PEAK}"

make --no-print-directory .venv/.installed
if ! .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: torch in .venv does not see the GPU (a CPU build, or no CUDA driver)" >&2
  exit 2
fi

# A platform of its own (short path: the embedded PostgreSQL's socket lives in it), removed at exit
# unless GPU_CHECK_HOME names one to keep.
export LLMOPS_HOME="${GPU_CHECK_HOME:-$(mktemp -d /tmp/llmops-gpu-XXXXXX)}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
trap '.venv/bin/llmops db stop >/dev/null 2>&1 || true; [ -n "${GPU_CHECK_HOME:-}" ] || rm -rf "$LLMOPS_HOME"' EXIT
echo "gpu_check: $GPUS x $NAME, $STEPS steps, peak ${PEAK:-unknown} TFLOP/s a GPU, home $LLMOPS_HOME"

GPUS="$GPUS" STEPS="$STEPS" PEAK="$PEAK" .venv/bin/python - <<'EOF'
import os

import dagster as dg

from assets.dataset import raw_examples, validated_dataset
from assets.prompts import prompt_set
from assets.training import base_model, finetuned_checkpoint
from llmops_dagster.definitions import defs

gpus, steps, peak = int(os.environ["GPUS"]), int(os.environ["STEPS"]), os.environ["PEAK"]
finetune = {"num_processes": gpus, "deepspeed_config": "gpu_bf16_zero2", "seq_len": 256,
            "max_steps": steps, "checkpoint_every": steps}  # the README's recipe; one checkpoint, at the end
if peak:
    finetune["peak_tflops"] = float(peak) * gpus
result = dg.materialize(
    [raw_examples, validated_dataset, prompt_set, base_model, finetuned_checkpoint], resources=defs.resources,
    run_config={"ops": {
        "base_model": {"config": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                                  "num_hidden_layers": 12, "num_attention_heads": 12,
                                  "max_position_embeddings": 1024}},
        "finetuned_checkpoint": {"config": finetune}}})
[event] = result.asset_materializations_for_node("finetuned_checkpoint")
m = {key: value.value for key, value in event.metadata.items()}
print(f"\ntokens/s     {m['tokens_per_s']}  ({m['world_size']} ranks, {m['global_step']} steps, "
      f"{m['wall_seconds']} s of training)")
print(f"model TFLOP/s {m['model_tflops_per_s']}  (6 x parameters x tokens/s)")
print(f"MFU          {m['mfu']}" + ("" if peak else "  (set PEAK_TFLOPS_PER_GPU for this GPU)"))
EOF
