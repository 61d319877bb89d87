"""The decode engine alone under a steady load, no HTTP: SmolLM2-135M with 4 random rank-8
LoRA adapters and the bare base, ``--waiting`` rows always queued (a finished row is replaced
at once), 16 tokens each with EOS ignored, for ``--seconds``.

    python bench/engine_load.py --dtype float32 --rows 16 --no-prefix-cache
    python bench/engine_load.py --dtype bfloat16 --rows 32

Prints tokens/s, steps and the median step time: the ceiling ``plugtune serve`` approaches
on bench/serving.py's load before HTTP and tokenizing take their share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import PROMPT, make_adapters  # noqa: E402

TICKETS = ["My card was charged twice", "The parcel never arrived", "I cannot log in", "Change my email address"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", type=int, default=32, help="the engine's max_rows (plugtune serve --max-batch)")
    parser.add_argument("--waiting", type=int, default=32, help="rows kept queued (the benchmark's clients)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--no-prefix-cache", action="store_true")
    args = parser.parse_args()
    from plugtune.serving.engine import RowSpec
    from plugtune.serving.host import AdapterHost

    host = AdapterHost.from_adapters(*make_adapters(4), dtype=getattr(torch, args.dtype))
    host.use(None)
    names = [None, *(f"serve-{i}" for i in range(4))]
    engine = host.decode_engine(max_rows=args.rows, prefix_cache_bytes=0 if args.no_prefix_cache else 2**28)
    sent = 0

    def add() -> None:
        nonlocal sent
        ids = host.tokenizer(PROMPT.format(text=TICKETS[sent % 4]))["input_ids"]
        engine.add(RowSpec(ids, names[sent % 5], 16, ignore_eos=True))
        sent += 1

    for _ in range(args.waiting):
        add()
    done, times, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        began = time.perf_counter()
        events = engine.step()
        times.append(time.perf_counter() - began)
        for event in events:
            if event.finished:
                done += 1
                add()
    elapsed = time.perf_counter() - start
    print(f"{args.dtype}, {args.rows} rows, prefix cache {'off' if args.no_prefix_cache else 'on'}: "
          f"{done * 16 / elapsed:.1f} tokens/s, {len(times)} steps, median step {statistics.median(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
