"""A real LoRA adapter for the embedded model, made with `peft` (rank 8 on the attention's q
and v projections, random weights large enough to change greedy output)."""

from __future__ import annotations

from pathlib import Path

RANK = 8


def make_adapter(folder: Path, seed: int) -> Path:
    """Write a PEFT adapter folder (`adapter_config.json` + weights) for the embedded model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.engines import embedded

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(embedded.prepare("smollm2"), dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder
