"""Real LoRA adapters for the embedded model, made with `peft` (rank 8 on the attention's q
and v projections, random weights large enough to change greedy output)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

RANK = 8


def make_adapters(root: Path, names: Sequence[str]) -> dict[str, Path]:
    """Write one PEFT adapter folder (`adapter_config.json` + weights) per name under `root`,
    each from its own seed (the base model is loaded once)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.engines import embedded

    base = AutoModelForCausalLM.from_pretrained(embedded.prepare("smollm2"), dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    folders = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter_name, param in model.named_parameters():
                if "lora_" in parameter_name:
                    param.normal_(0.0, 0.2)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders
