"""Training speed and whole-process peak memory: ours (memory_efficient) against torchvision.

Every (implementation, depth) runs in its own fresh Python process, so each peak RSS (the child's
ru_maxrss) covers exactly one configuration, in ``--rounds`` rounds that take the implementations
in turn; the table gives medians, ranges and each ratio's worst round. A training step is
forward, cross-entropy loss, backward and an SGD update, timed after warm-up.

    # target 1: DenseNet-121
    python benchmarks/train_memory.py --preset densenet121 --batch 32 --size 224
    # target 2: DenseNet-BC k=12, 41 layers per block (L=250), ImageNet stem, 128 px
    python benchmarks/train_memory.py --bc-depth 250 --batch 64 --size 128
    # depth sweep of that family, with CSV and plot
    python benchmarks/train_memory.py --bc-depth 100 250 400 --batch 64 --size 128 --out results/x

Implementations: ``torchvision`` (default path), ``torchvision-me`` (torchvision's
memory_efficient=True, checkpointing) and ``ours`` (densenet's memory_efficient=True).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from densenet.hardware import DTYPES, PRECISIONS, cpu_flags

IMPLEMENTATIONS = ("torchvision", "torchvision-me", "ours", "ours-standard")
DEFAULT_IMPLEMENTATIONS = ("torchvision", "torchvision-me", "ours")


def cpu_features() -> str:
    """The vector extensions that decide fp32 and bf16 speed on this CPU."""
    flags = cpu_flags()
    if not flags:
        return "unknown vector extensions"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(flag for flag in wanted if flag in flags) or "no AVX2"


def bc_config(depth: int) -> dict:
    """DenseNet-BC, k=12, with ``depth`` = 6n + 4 layers over three blocks, 24 stem channels."""
    if (depth - 4) % 6:
        raise SystemExit(f"DenseNet-BC depth must be 6n + 4 (100, 250, 400, ...), got {depth}")
    n = (depth - 4) // 6
    return dict(growth_rate=12, block_config=(n, n, n), num_init_features=24, bn_size=4)


def build(implementation: str, spec: dict):
    import torchvision

    from densenet import DenseNet, create_model

    if spec["preset"]:
        if implementation.startswith("torchvision"):
            factory = getattr(torchvision.models, spec["preset"])
            return factory(memory_efficient=implementation == "torchvision-me")
        return create_model(spec["preset"], memory_efficient=implementation == "ours")
    fields = dict(spec["fields"], num_classes=1000)
    if implementation.startswith("torchvision"):
        return torchvision.models.DenseNet(
            **fields, memory_efficient=implementation == "torchvision-me"
        )
    return DenseNet(**fields, stem="imagenet", memory_efficient=implementation == "ours")


def _watch_memory(limit_bytes: int) -> None:
    # Keep a shared machine safe: leave as soon as this process grows past the cap.
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * page
        if rss > limit_bytes:
            print(json.dumps({"error": f"over the {limit_bytes / 2**30:.1f} GiB cap"}), flush=True)
            os._exit(3)
        time.sleep(0.02)


def child(spec: dict) -> None:
    """Measure one configuration; print one JSON line."""
    threading.Thread(target=_watch_memory, args=(int(spec["cap_gb"] * 2**30),), daemon=True).start()
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    layout = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    torch.manual_seed(0)
    model = build(spec["implementation"], spec).train().to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(spec["batch"], 3, spec["size"], spec["size"]).contiguous(memory_format=layout)
    y = torch.randint(0, 1000, (spec["batch"],))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(spec["warmup"]):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak = after.ru_maxrss * 1024
    print(
        json.dumps(
            {
                "img_per_s": spec["batch"] * spec["steps"] / seconds,
                "peak_rss_gb": peak / 1e9,
                "rss_before_first_step_gb": rss_before / 1e9,
                # Memory the allocator gave back and took again: each new page is zeroed by the
                # kernel, in system time.
                "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / spec["steps"],
                "system_s_per_step": (after.ru_stime - before.ru_stime) / spec["steps"],
                # Other work on the machine slows the timing (not the memory): keep it on record.
                "load_average_1min": os.getloadavg()[0],
            }
        ),
        flush=True,
    )


def measure(spec: dict) -> dict:
    env = dict(os.environ)
    if spec["keep_freed_memory"]:
        # No block from mmap, and no heap trimmed: freed memory is reused, never given back and
        # faulted in again; the price is the heaps' fragmentation, kept for good.
        env["MALLOC_MMAP_MAX_"] = "0"
        env["MALLOC_TRIM_THRESHOLD_"] = str(2**62)
    if spec["mmap_threshold"]:
        # glibc serves blocks under its (adaptive, up to 32 MiB) mmap threshold from heaps that
        # keep freed memory: a fixed threshold returns every freed activation to the OS at once.
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["mmap_threshold"])
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def run(args: argparse.Namespace) -> list[dict]:
    from densenet.tools.bench import rotated  # the parent only: children import what they need

    base = dict(
        batch=args.batch,
        size=args.size,
        dtype=args.dtype,
        channels_last=not args.nchw,
        warmup=args.warmup,
        steps=args.steps,
        cap_gb=args.cap_gb,
        threads=args.threads,
        mmap_threshold=args.mmap_threshold,
        keep_freed_memory=args.keep_freed_memory,
    )
    if args.preset:
        cases = [(args.preset, dict(base, preset=args.preset, fields=None))]
    else:
        cases = [
            (f"DenseNet-BC-{d} k=12", dict(base, preset=None, fields=bc_config(d), depth=d))
            for d in sorted(args.bc_depth)
        ]
    rows, last_fit = [], {}
    for label, spec in cases:
        results: dict[str, list[dict]] = {implementation: [] for implementation in args.impl}
        errors: dict[str, str] = {}
        for implementation in args.impl:
            previous = last_fit.get(implementation)
            # Deeper nets only while they fit: project quadratic growth in training from the last
            # depth (the memory before the first step, mostly the libraries, stays).
            if previous and _projected(previous, spec["depth"]) > args.cap_gb * 1.074:
                errors[implementation] = f"skipped: projected over the {args.cap_gb} GiB cap"
        # Rounds interleave the implementations, so that load from elsewhere on the machine
        # falls on all of them alike; ratios are taken within each round.
        for round_index in range(args.rounds):
            for implementation in rotated(args.impl, round_index):
                if implementation in errors:
                    continue
                result = measure(dict(spec, implementation=implementation))
                if "error" in result:
                    errors[implementation] = result["error"]
                    continue
                results[implementation].append(result)
                print(_format_round(label, implementation, round_index, result), flush=True)
        for implementation in args.impl:
            row = {"model": label, "depth": spec.get("depth", ""), "implementation": implementation}
            if implementation in errors:
                row["error"] = errors[implementation]
            else:
                row.update(_summary(results[implementation]))
                if spec.get("depth"):
                    last_fit[implementation] = (
                        spec["depth"],
                        row["rss_before_first_step_gb"],
                        row["peak_rss_gb"] - row["rss_before_first_step_gb"],
                    )
            rows.append(row)
        _add_ratios([row for row in rows if row["model"] == label], results)
    return rows


def _summary(rounds: list[dict]) -> dict:
    """Medians over rounds, with the fastest and slowest speed and the smallest and largest peak."""
    speeds = [r["img_per_s"] for r in rounds]
    peaks = [r["peak_rss_gb"] for r in rounds]
    return {
        "rounds": len(rounds),
        "img_per_s": statistics.median(speeds),
        "img_per_s_min": min(speeds),
        "img_per_s_max": max(speeds),
        "peak_rss_gb": statistics.median(peaks),
        "peak_rss_gb_min": min(peaks),
        "peak_rss_gb_max": max(peaks),
        "rss_before_first_step_gb": statistics.median(
            r["rss_before_first_step_gb"] for r in rounds
        ),
        # Other work on the machine slows the timing (not the memory): keep it on record.
        "load_average_1min_max": max(r["load_average_1min"] for r in rounds),
        "page_faults_per_step": statistics.median(r["page_faults_per_step"] for r in rounds),
        "system_s_per_step": statistics.median(r["system_s_per_step"] for r in rounds),
    }


def _add_ratios(rows: list[dict], results: dict[str, list[dict]]) -> None:
    """Each row's speed over torchvision's default and peak over torchvision memory_efficient's,
    round by round: the median and the worst round."""
    for row in rows:
        own = results[row["implementation"]]
        for key, reference, measure_of, worst in (
            ("speed_vs_tv_default", "torchvision", "img_per_s", min),
            ("memory_vs_tv_me", "torchvision-me", "peak_rss_gb", max),
        ):
            theirs = results.get(reference, [])
            if "error" in row or not theirs or len(theirs) != len(own):
                continue
            ratios = [a[measure_of] / b[measure_of] for a, b in zip(own, theirs, strict=True)]
            row[key] = statistics.median(ratios)
            row[key + "_worst"] = worst(ratios)


def _projected(previous: tuple[int, float, float], depth: int) -> float:
    last_depth, before, growth = previous
    return before + growth * (depth / last_depth) ** 2


def _format_round(model: str, implementation: str, round_index: int, result: dict) -> str:
    return (
        f"{model:>22} {implementation:>15} round {round_index + 1}: "
        f"{result['img_per_s']:8.2f} img/s {result['peak_rss_gb']:6.2f} GB peak RSS "
        f"{result['page_faults_per_step']:9,.0f} page faults/step"
    )


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | implementation | img/s: median (range) | peak RSS GB: median (range) "
        "| RSS before 1st step (GB) | speed / tv default: median (worst round) "
        "| memory / tv memory_efficient: median (worst round) "
        "| page faults per step (median) | system s per step (median) | highest load average |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['implementation']} | {row['error']} ||||||||")
            continue
        lines.append(
            f"| {row['model']} | {row['implementation']} "
            f"| {row['img_per_s']:.2f} ({row['img_per_s_min']:.2f}-{row['img_per_s_max']:.2f}) "
            f"| {row['peak_rss_gb']:.2f} ({row['peak_rss_gb_min']:.2f}-"
            f"{row['peak_rss_gb_max']:.2f}) | {row['rss_before_first_step_gb']:.2f} "
            f"| {_ratio(row, 'speed_vs_tv_default')} | {_ratio(row, 'memory_vs_tv_me')} "
            f"| {row['page_faults_per_step']:,.0f} | {row['system_s_per_step']:.2f} "
            f"| {row['load_average_1min_max']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _ratio(row: dict, key: str) -> str:
    if key not in row:
        return "-"
    return f"{row[key]:.2f}x ({row[key + '_worst']:.2f}x)"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4.4))
    for implementation in dict.fromkeys(row["implementation"] for row in rows):
        points = [r for r in rows if r["implementation"] == implementation and "error" not in r]
        depths = [r["depth"] for r in points]
        mem_ax.plot(depths, [r["peak_rss_gb"] for r in points], "o-", label=implementation)
        speed_ax.plot(depths, [r["img_per_s"] for r in points], "o-", label=implementation)
    mem_ax.set(xlabel="depth L", ylabel="whole-process peak RSS (GB)", title="training memory")
    speed_ax.set(xlabel="depth L", ylabel="images / s", title="training speed")
    for ax in (mem_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a densenet preset that torchvision also has")
    model.add_argument("--bc-depth", type=int, nargs="+", help="DenseNet-BC k=12 depth(s) L")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", choices=PRECISIONS, default="bf16", help="autocast dtype")
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=3, help="times each configuration runs, interleaved"
    )
    parser.add_argument(
        "--impl", nargs="+", choices=IMPLEMENTATIONS, default=DEFAULT_IMPLEMENTATIONS
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--cap-gb", type=float, default=7.0, help="per-process RSS cap (GiB)")
    # With mmap off, glibc has no mmap threshold to set: one setting or the other.
    malloc = parser.add_mutually_exclusive_group()
    malloc.add_argument(
        "--mmap-threshold",
        type=int,
        help="bytes: glibc's MALLOC_MMAP_THRESHOLD_ for every configuration (default: glibc's own)",
    )
    malloc.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse (MALLOC_MMAP_MAX_=0, no trimming) in every "
        "configuration, instead of returning it to the system and faulting it in again",
    )
    parser.add_argument("--out", type=Path, help="write OUT.csv, OUT.md (and OUT.png for a sweep)")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not args.preset and not args.bc_depth:
        args.preset = "densenet121"

    import torch

    from densenet.tools.bench import machine_description

    command = "python benchmarks/train_memory.py " + " ".join(sys.argv[1:])
    machine = "; ".join(machine_description(torch.device("cpu")))
    header = (
        f"Machine: {machine} ({os.cpu_count()} CPUs, {cpu_features()}). "
        f"{args.dtype} autocast, {'NCHW' if args.nchw else 'channels_last'}, batch {args.batch}, "
        f"{args.size} px, {args.threads} threads, {args.warmup} warm-up + {args.steps} timed SGD "
        f"steps, each configuration in a fresh process, {args.rounds} interleaved rounds, "
        "glibc malloc with "
        + (
            f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
            if args.mmap_threshold
            else "its default (adaptive) mmap threshold"
        )
        + (
            ", keeping freed memory (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=2**62)"
            if args.keep_freed_memory
            else ""
        )
        + f".\nCommand: `{command}`"
    )
    rows = run(args)
    table = markdown(rows, header)
    print()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table)
        with args.out.with_suffix(".csv").open("w", newline="") as f:
            fields = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        if args.bc_depth and len(args.bc_depth) > 1:
            plot(rows, args.out.with_suffix(".png"), header.split("\n")[0])


if __name__ == "__main__":
    main()
