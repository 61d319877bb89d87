"""The support_department task's data: support_department.jsonl beside this file, as the test split."""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "support_department.jsonl"


def load(**kwargs):
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
