"""A stand-in for ``smollm2-135m`` on a machine its weights cannot reach: SmolLM2-135M's own
config and tokenizer with seeded random weights, put where plugtune's alias finds its cached
conversion, so recipes, the benchmarks and ``plugtune serve`` run unchanged.

    python bench/gpu_standin.py FOLDER   # FOLDER: config.json and tokenizer files (bench/gpu_kit.sh pack)

Only for speed and memory figures (bench/gpu_kit.sh): a step's time and memory depend on the
shapes, not the values. The alias's package file becomes a one-line placeholder saying what it
is (it is not a GGUF file: anything that tried to read it as one would fail, not run on random
weights unknowingly), and ``standin.json`` in the converted folder marks the weights as random,
which bench/gpu_check.py writes into its results. Refuses to run where the real weights are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKER = "standin.json"


def is_standin() -> bool:
    """True when ``smollm2-135m`` on this machine is this script's random stand-in."""
    from plugtune.artifacts.models import converted_folder
    from plugtune.plugins.models.builtin import SMOLLM2

    found = SMOLLM2.local()
    return found is not None and (converted_folder(found) / MARKER).exists()


def main(folder: Path) -> int:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from plugtune.artifacts.models import converted_folder, write_model_folder
    from plugtune.plugins.models.builtin import SMOLLM2

    if SMOLLM2.local() is not None and not is_standin():
        print("gpu_standin: the real smollm2-135m is on this machine; nothing to stand in for", file=sys.stderr)
        return 1
    placeholder = SMOLLM2.cached_member()
    placeholder.parent.mkdir(parents=True, exist_ok=True)
    placeholder.write_text("not a GGUF file: bench/gpu_standin.py's placeholder for smollm2-135m (random weights)\n")
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())

    def side_files(staging: Path) -> None:
        for source in folder.iterdir():
            shutil.copy(source, staging / source.name)
        (staging / MARKER).write_text(json.dumps({"weights": "random (seed 0)", "architectures": config.architectures,
                                                  "parameters": parameters}))

    target = write_model_folder(model, converted_folder(placeholder), side_files)
    print(f"gpu_standin: smollm2-135m -> {target} ({parameters:,} random parameters, SmolLM2-135M's config)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").is_file():
        print("usage: python bench/gpu_standin.py FOLDER (with config.json and the tokenizer files)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
