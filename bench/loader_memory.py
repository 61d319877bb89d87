"""Loading a 100 MB table: the streaming ``table`` loader against ``datasets`` (the previous
implementation: ``load_dataset("csv")`` + ``train_test_split`` + ``to_list``), measured in the
same run.

Each loader runs in a fresh subprocess (``bench/loader_memory.py --one NAME FILE``) so peak
RSS is its own: growth = peak RSS after loading minus RSS after the imports. The file is a
generated TSV of short sentences (~66 bytes a row, 1.5 M rows), like SST-2 scaled up.

    .venv/bin/python bench/loader_memory.py
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import write_section

SIZE = 100_000_000


def generate(path: Path) -> None:
    rng = random.Random(0)
    words = ["the", "film", "movie", "plot", "acting", "was", "is", "and", "a", "very", "really", "quite", "story", "cast", "ending", "great", "awful"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("text\tlabel\n")
        written = 0
        while written < SIZE:
            line = " ".join(rng.choices(words, k=12)) + "\t" + rng.choice(["pos", "neg"]) + "\n"
            fh.write(line)
            written += len(line)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(name: str, path: Path) -> dict:
    if name == "streaming":
        from plugtune.plugins.loaders.table import TableLoader, TableOptions

        loader = TableLoader(TableOptions.model_validate({"path": str(path), "test_size": 0.1}))
        base, started = rss_mb(), time.perf_counter()
        splits = loader.load(0)
    else:
        import csv

        import datasets

        datasets.disable_progress_bars()
        base, started = rss_mb(), time.perf_counter()
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE,
                                   cache_dir=os.environ["BENCH_CACHE"])
        parts = ds.train_test_split(test_size=0.1, seed=0, shuffle=True)
        splits = {"train": parts["train"].to_list(), "test": parts["test"].to_list()}
    return {"seconds": time.perf_counter() - started, "rss_growth_mb": rss_mb() - base,
            "rows": len(splits["train"]) + len(splits["test"])}


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], Path(sys.argv[3]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.tsv"
        generate(path)
        size_mb = path.stat().st_size / 1e6
        results = {}
        for name in ("streaming", "datasets"):
            out = subprocess.run([sys.executable, __file__, "--one", name, str(path)], capture_output=True, text=True,
                                 env=dict(os.environ, BENCH_CACHE=str(Path(tmp) / "cache"), HF_DATASETS_OFFLINE="1"),
                                 check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    s, d = results["streaming"], results["datasets"]
    text = "\n".join([
        "## Loading a 100 MB table (streaming `table` loader vs `datasets`)",
        "",
        ("Command: `.venv/bin/python bench/loader_memory.py`. A generated TSV of "
        f"{size_mb:.0f} MB ({s['rows']:,} rows of ~{size_mb * 1e6 / s['rows']:.0f} bytes), loaded and split 90/10; each loader in its own "
        "process; peak RSS growth over the process after its imports. Measured on the shared 2-core CPU machine "
        "(other sessions were running), so seconds are indicative."),
        "",
        "| loader | seconds | peak RSS growth (MB) | × file size |",
        "| --- | --- | --- | --- |",
        f"| `table` (streams lines into rows) | {s['seconds']:.1f} | {s['rss_growth_mb']:.0f} | {s['rss_growth_mb'] / size_mb:.1f} |",
        (f"| `datasets` load_dataset + train_test_split + to_list (previous) | {d['seconds']:.1f} | {d['rss_growth_mb']:.0f} | "
        f"{d['rss_growth_mb'] / size_mb:.1f} |"),
        "",
        ("What remains is the rows themselves as Python dicts and strings (~5× the bytes for rows this short);"
        " the streaming loader adds no whole-file copy, and writes no Arrow cache to disk."),
    ])
    write_section(text, key="loader-memory")
    print(text)


if __name__ == "__main__":
    main()
