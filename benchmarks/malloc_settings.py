"""DenseNet-121 inference under glibc malloc settings: what fresh memory pages cost.

Every layer of a DenseNet allocates activation-sized tensors. glibc serves allocations above its
mmap threshold (adaptive, at most 32 MiB by default) with fresh pages from the kernel, which the
process then faults in one 4 KiB page at a time, and returns freed memory to the kernel. Where
page faults are expensive (virtual machines), that costs more than some of the arithmetic. This
script times torchvision's model (bf16 autocast, channels_last) and ``optimize_for_inference``
(bf16) in a fresh process per setting, the settings taking turns over ``--rounds`` rounds.

    python benchmarks/malloc_settings.py --batch 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "glibc's defaults": {},
    "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=17179869184": {
        "MALLOC_MMAP_THRESHOLD_": "4294967296",
        "MALLOC_TRIM_THRESHOLD_": "17179869184",
    },
    "MALLOC_MMAP_THRESHOLD_=4294967296": {"MALLOC_MMAP_THRESHOLD_": "4294967296"},
    "THP_MEM_ALLOC_ENABLE=1 (PyTorch: transparent huge pages)": {"THP_MEM_ALLOC_ENABLE": "1"},
}


def child(batch: int, calls: int) -> None:
    """Median seconds per call of each network; one JSON line."""
    import resource
    import time

    import torch

    import densenet
    from densenet.tools.bench import torchvision_twin

    torch.manual_seed(0)
    model = densenet.create_model("densenet121").eval()
    twin = torchvision_twin(model).to(memory_format=torch.channels_last)
    optimized = densenet.optimize_for_inference(model, dtype=torch.bfloat16)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def torchvision_bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            twin(x)

    runs = {"torchvision": torchvision_bf16, "optimize_for_inference": lambda: optimized(x)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()
        for _ in range(calls):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    result = {name: statistics.median(times) for name, times in seconds.items()}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="timed calls per process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.batch, args.calls)
        return

    from densenet.tools.bench import results_head, rotated

    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for round_index in range(args.rounds):
        for name in rotated(list(SETTINGS), round_index):
            command = [sys.executable, __file__, "--child", "--batch", str(args.batch)]
            command += ["--calls", str(args.calls)]
            env = {**os.environ, **SETTINGS[name]}
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(output.stdout.strip().splitlines()[-1]))
    title = f"DenseNet-121 bf16 inference, batch {args.batch}, under malloc settings"
    lines = results_head(title, "benchmarks/malloc_settings.py", sys.argv[1:])
    lines += [
        f"- a fresh process per setting and round, {args.rounds} rounds taking turns, each "
        f"figure the median over rounds of a process's median of {args.calls} calls",
        "",
        "| setting | torchvision, bf16 autocast, channels_last (ms) | optimize_for_inference, "
        "bf16 (ms) | peak RSS (GB) |",
        "|---|---|---|---|",
    ]
    for name, rounds in results.items():
        tv = statistics.median(r["torchvision"] for r in rounds) * 1e3
        ours = statistics.median(r["optimize_for_inference"] for r in rounds) * 1e3
        peak = statistics.median(r["peak_rss_gb"] for r in rounds)
        lines.append(f"| {name} | {tv:.0f} | {ours:.0f} | {peak:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
