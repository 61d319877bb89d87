"""plugtune's chat loss mask against TRL's ``SFTTrainer`` with ``assistant_only_loss=True``.

On the same conversations and the same SmolLM2 tokenizer, TRL tokenizes each conversation and
takes the assistant mask transformers derives from ``{% generation %}`` markers in the chat
template; plugtune's ``chat`` task renders the *unmarked* template and finds each message by
rendering probes. The script compares, per conversation, the tokens and the trained positions
and writes the result to BENCHMARKS.md (section ``chat-masks``).

TRL is a peer, never a plugtune dependency: it is installed beside the venv, without its
declared dependencies (it pins none that this venv lacks at these versions)::

    .venv/bin/python -m pip install --no-deps --target bench/out/trl trl==1.16.0
    HF_HUB_OFFLINE=1 .venv/bin/python bench/chat_masks.py

Data: ``recipes/data/support_chats.jsonl`` (the shipped multi-turn set).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "out" / "trl"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section  # noqa: E402

# SmolLM2's own template (its default system prompt included) with TRL's generation markers
# around what the assistant says; rendered, it is the same text as the unmarked one.
SMOLLM2_WITH_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main() -> None:
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from plugtune.artifacts.models import gguf_to_hf, local_location
    from plugtune.data.tasks import build_task

    location = local_location("smollm2-135m")
    folder = gguf_to_hf(location) if location.suffix == ".gguf" else location
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in (ROOT / "recipes/data/support_chats.jsonl").read_text().splitlines() if line]
    ours = build_task({"type": "chat"}, strict=True)  # template: tokenizer (SmolLM2's own, unmarked)
    ours.bind_tokenizer(tokenizer)
    encoded = [ours.encode(ours.normalize(r), tokenizer, 10**6) for r in rows]

    marked = AutoTokenizer.from_pretrained(folder)
    marked.chat_template = SMOLLM2_WITH_GENERATION
    model = AutoModelForCausalLM.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, assistant_only_loss=True, max_length=None, report_to=[],
                         dataset_num_proc=None, packing=False, bf16=False, use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"messages": r["messages"]} for r in rows]),
                             processing_class=marked)
        theirs = trainer.train_dataset
    same_ids = same_mask = 0
    ours_tokens = theirs_tokens = 0
    first_difference = None
    for i, (mine, row) in enumerate(zip(encoded, theirs)):
        mask = [label != -100 for label in mine["labels"]]
        their_mask = [label != -100 for label in row["labels"]]  # TRL folds its assistant mask into labels
        same_ids += mine["input_ids"] == list(row["input_ids"])
        same_mask += mask == their_mask
        ours_tokens += sum(mask)
        theirs_tokens += sum(their_mask)
        if first_difference is None and (mask != their_mask or mine["input_ids"] != list(row["input_ids"])):
            first_difference = i
    n = len(rows)
    text = "\n".join([
        "## Chat loss masks: plugtune vs TRL SFTTrainer (assistant_only_loss)",
        "",
        "`HF_HUB_OFFLINE=1 .venv/bin/python bench/chat_masks.py` (TRL installed with "
        "`pip install --no-deps --target bench/out/trl trl==1.16.0`).",
        "",
        f"TRL {trl.__version__}, SmolLM2-135M-Instruct's tokenizer, `recipes/data/support_chats.jsonl` ({n} conversations). "
        "TRL takes transformers' assistant mask from `{% generation %}` markers added to SmolLM2's template; "
        "plugtune's `chat` task renders the unmarked template and locates each message by rendering probes.",
        "",
        "| | conversations | trained tokens |",
        "| --- | --- | --- |",
        f"| identical token ids | {same_ids} / {n} | |",
        f"| identical trained positions | {same_mask} / {n} | plugtune {ours_tokens:,}, TRL {theirs_tokens:,} |",
        "",
        "Both train the assistant's content and its `<|im_end|>`, never the newline after it, the role headers "
        "or the default system prompt." + (f" First difference: conversation {first_difference + 1}." if first_difference is not None else ""),
    ])
    write_section(text, "chat-masks")
    print(text)


if __name__ == "__main__":
    main()
