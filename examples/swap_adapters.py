"""One base model, several adapters: load the base once, attach adapters, switch between them.

    python examples/swap_adapters.py adapters/quickstart adapters/reviews-smollm2-lora

Each input is answered by every adapter (each adapter wraps the input in its own prompt
template) and then by all adapters at once, one adapter per row. Last, the time a switch
between resident adapters takes, against the time the base took to load.
"""

from __future__ import annotations

import statistics
import sys
import time

from rich.console import Console
from rich.table import Table

from plugtune import AdapterHost

INPUTS = [
    "I was charged twice for my subscription this month.",
    "The parcel tracking has not updated in six days.",
    "A clumsy, joyless film that overstays its welcome.",
    "The performances are warm and the ending is a quiet triumph.",
]


def main(directories: list[str]) -> None:
    console = Console()
    started = time.perf_counter()
    host = AdapterHost.from_adapters(*directories)
    load_seconds = time.perf_counter() - started
    names = list(host.adapters)
    console.print(f"base {host.base.info.id} and {len(names)} adapters loaded in {load_seconds:.1f} s: {', '.join(names)}")

    table = Table(title="the same inputs through each adapter on one base")
    table.add_column("input")
    table.add_column("base (no adapter)")
    for name in names:
        table.add_column(name)
    outputs = {name: host.generate(INPUTS, name, max_new_tokens=3) for name in [None, *names]}
    for i, text in enumerate(INPUTS):
        table.add_row(text, *[outputs[name][i] for name in [None, *names]])
    console.print(table)

    per_row = [names[i % len(names)] for i in range(len(INPUTS))]
    mixed = host.generate(INPUTS, per_row, max_new_tokens=3)
    console.print("one call, one adapter per row: " + "; ".join(f"{n} -> {o}" for n, o in zip(per_row, mixed)))

    timings = []
    for i in range(200):
        t = time.perf_counter()
        host.use(names[i % len(names)])
        timings.append(time.perf_counter() - t)
    console.print(
        f"switching between resident adapters: median {statistics.median(timings) * 1e3:.2f} ms, "
        f"max {max(timings) * 1e3:.2f} ms over {len(timings)} switches (no base reload)"
    )


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python examples/swap_adapters.py ADAPTER_DIR [ADAPTER_DIR ...]")
    main(sys.argv[1:])
