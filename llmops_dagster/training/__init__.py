"""Fine-tuning: the base model, the standalone DeepSpeed LoRA training script and its launcher."""
