"""Random-init LoRA adapters for a loaded base, saved as ordinary plugtune adapters.

For benchmarks and tests that need many adapters without training any: the tensors carry
peft's names and the config is peft's ``LoraConfig``, so plain peft loads them too. ``lora_B``
is random (not peft's zero init), so each adapter really changes the output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from plugtune.artifacts.adapters import save_adapter
from plugtune.artifacts.models import LoadedBase
from plugtune.data.tasks import Task


def random_lora_adapter(directory: str | Path, base: LoadedBase, task: Task, *, name: str | None = None, r: int = 8,
                        alpha: float = 16, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0,
                        scale: float = 0.05) -> Path:
    """Write a rank-``r`` LoRA adapter on every linear layer of ``base`` whose name ends in one
    of ``targets``; ``A`` ~ N(0, 1/in_features), ``B`` ~ N(0, scale^2)."""
    from peft import LoraConfig

    directory = Path(directory)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                        task_type="SEQ_CLS" if task.is_classification else "CAUSAL_LM").to_dict()
    config["inference_mode"] = True
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module_name, module in base.model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in targets:
            state[f"base_model.model.{module_name}.lora_A.weight"] = (
                torch.randn(r, module.in_features, generator=gen) / module.in_features ** 0.5)
            state[f"base_model.model.{module_name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * scale
    manifest = {"name": name or directory.name,
                "method": {"name": "lora", "options": {"r": r, "alpha": alpha, "target_modules": list(targets)},
                           "plugin": "lora", "distribution": "plugtune"},
                "base_model": base.info.to_dict(), "task": task.to_dict(), "training": {"synthetic": True, "seed": seed}}
    return save_adapter(directory, state=state, config=config, manifest=manifest)
