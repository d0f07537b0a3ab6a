"""Everything this project claims about CUDA, checked in one command on one GPU in under 8 minutes.

    PYTHONPATH=src python benchmarks/gpu_check.py --out results/gpu
    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/gpu --dry-run   # CPU, tiny sizes

Parts, each isolated (one that breaks is reported with its one-line error and the others run) and
each under a time cap, so that the run fits the rare, short loans of a GPU machine:

  a. the suite's CUDA tests (pytest -k cuda over the test files that mention CUDA);
  b. training steps, bf16 autocast, channels_last: DenseNet-121 (batch 128, 224 px) ours,
     ours memory_efficient, torchvision default and memory_efficient, timm; DenseNet-BC k=12
     L=250 (batch 64, 32 px) ours and ours memory_efficient; eager and torch.compile;
  c. DenseNet-121 inference at batch 1, 64 and 256: torchvision eager and compiled,
     optimize_for_inference (bf16) eager and compiled, timm compiled;
  d. `densenet train` on cuda (digits, 2 epochs), the same under torchrun, DDP through NCCL;
  e. the memory-efficient path against the standard one at full depth: outputs, input and
     parameter gradients and running statistics, in float32 and bf16 (what the suite's CUDA
     tests of that path, in a, leave out: they compare outputs and weight gradients of tiny
     networks).

a, d and e check correctness and run side by side, while background workers compile every
configuration of b and c once to fill inductor's on-disk caches, so that the timed compilations
are mostly cache hits. Then c and b time, alone on the machine. Measurements run in worker
processes (benchmarks/gpu_worker.py): a compilation past its cap can only be stopped by ending its
process, and the rest of the part goes on in a new one. The dry run runs "compile" configurations
eagerly: compiling even a tiny network takes a CPU longer than the whole dry run should.

Writes OUT/gpu_check.md and OUT/gpu_check.csv (each row with the machine and the command), the
pytest JUnit file, the training runs and every process's log (OUT/logs). Exit status 1 when a part
broke or a check of this project failed; speed and memory targets are reported as PASS or FAIL
without changing it, as are failures of torchvision or timm.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "benchmarks" / "gpu_worker.py"
# A skip that means the test never ran because this machine has no GPU.
NO_GPU_SKIP = re.compile(r"\b(no|needs? an?|without( an?)?) (CUDA|GPU)\b", re.IGNORECASE)
MODELS = {"densenet121": "DenseNet-121", "bc250": "DenseNet-BC k=12 L=250"}
IMPLS = {
    "ours": "ours",
    "ours-me": "ours memory_efficient",
    "tv": "torchvision",
    "tv-me": "torchvision memory_efficient",
    "timm": "timm",
    "ours-ofi": "ours optimize_for_inference bf16",
}


@dataclass(frozen=True)
class Plan:
    """Sizes and time caps of the real run on a GPU, or of the dry run on a CPU."""

    dry_run: bool
    device: str
    compile: bool  # whether "compile" configurations compile
    dn121: dict  # architecture overrides: none for the real DenseNet-121
    bc250: dict
    train: dict  # per model: batch and image size
    train_modes: tuple  # compiled or not
    steps: int  # timed training steps per window
    windows: int
    infer_batches: tuple
    infer_calls: tuple  # timed calls per window, for each batch size
    equivalence: dict  # per model: batch and image size
    seeds: int
    train_args: tuple  # of `densenet train`
    eager_cap: float  # seconds per configuration
    compile_cap: float
    warmers: int
    checks_cap: float  # seconds for a, d, e and the background compilation, side by side
    inference_cap: float  # c's; b has the rest of the budget


GPU_PLAN = Plan(
    dry_run=False,
    device="cuda",
    compile=True,
    dn121={},
    bc250={"block_config": [41, 41, 41]},
    train={"densenet121": (128, 224), "bc250": (64, 32)},
    train_modes=(False, True),
    steps=10,
    windows=3,
    infer_batches=(1, 64, 256),
    infer_calls=(50, 8, 5),
    equivalence={"densenet121": (16, 64), "bc250": (16, 32)},
    seeds=3,
    train_args=("--device", "cuda", "--epochs", "2"),
    eager_cap=40,
    compile_cap=90,
    warmers=4,
    checks_cap=180,
    inference_cap=100,
)
DRY_PLAN = replace(
    GPU_PLAN,
    dry_run=True,
    device="cpu",
    compile=False,
    dn121={"growth_rate": 8, "block_config": [1, 1, 1, 1], "num_init_features": 16},
    bc250={"block_config": [2, 2, 2]},
    train={"densenet121": (2, 32), "bc250": (2, 8)},
    train_modes=(False,),  # compiled they would run eagerly again: inference covers compilation
    steps=1,
    windows=1,
    infer_batches=(1, 2),
    infer_calls=(2, 2),
    equivalence={"densenet121": (4, 32), "bc250": (4, 8)},
    seeds=1,
    train_args=(
        *("--device", "cpu", "--epochs", "1", "--precision", "fp32"),
        *("--model-override", "block_config=[1,1,1]", "--model-override", "growth_rate=4"),
    ),
    eager_cap=120,
    compile_cap=120,
    warmers=1,
)


@dataclass
class Row:
    part: str
    check: str
    status: str = ""  # PASS, FAIL, ERROR, SLOW (over its time cap), SKIP; "" for a measurement
    result: str = ""
    detail: str = ""
    numbers: dict = field(default_factory=dict)
    ours: bool = True  # False: a FAIL or ERROR here (a target, another library) is not a failure


@dataclass
class Context:
    plan: Plan
    out: Path
    deadline: float = 0.0  # the part's
    # What the background compilation of each configuration recorded, by name.
    warmed: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def judged(self, ok: bool) -> str:
        # Tiny networks on a CPU say nothing about the targets: the dry run checks the plumbing.
        return "SKIP" if self.plan.dry_run else ("PASS" if ok else "FAIL")

    def supervise(self, configs: list[dict], log: str, **options) -> dict[str, list[dict]]:
        plan = self.plan
        job = {"device": plan.device, "compile": plan.compile, "warm_only": False}
        job.update(options.pop("job", {}))
        options.setdefault("cap", self.cap)
        command = lambda todo: [sys.executable, str(WORKER), json.dumps({**job, "configs": todo})]  # noqa: E731
        return supervise(command, configs, deadline=self.deadline, log=self.log(log), **options)

    def cap(self, config: dict) -> float:
        return self.plan.compile_cap if config.get("compile") else self.plan.eager_cap

    def measure(self, configs: list[dict], log: str) -> dict[str, list[dict]]:
        """Records of ``configs``; one whose compilation ran over its cap in the background is
        not tried again (one that failed is: it may have run out of the memory it shared)."""
        settled = {}
        for config in configs:
            warmed = self.warmed.get(config["name"], [])
            why = next((r["slow"] for r in warmed if "slow" in r), "stopped")
            if why != "stopped":  # "stopped": cut short when the timed parts began
                settled[config["name"]] = [{"slow": f"background compilation {why}"}]
        todo = [config for config in configs if config["name"] not in settled]
        return {**self.supervise(todo, log), **settled}


def joined(*texts: str) -> str:
    return "; ".join(filter(None, texts))


def child_env() -> dict:
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


def last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")[:300]


def _kill(process: subprocess.Popen) -> None:
    # The process leads its own group: inductor's compile workers go with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_logged(argv: list[str], timeout: float, log: Path) -> int | None:
    """Exit status of ``argv`` (its output appended to ``log``); None when it ran out of time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        process = subprocess.Popen(
            argv, cwd=REPO, env=child_env(), stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            return process.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            _kill(process)
            return None


def supervise(
    command: Callable[[list[dict]], list[str]],
    configs: list[dict],
    cap: Callable[[dict], float],
    deadline: float,
    log: Path,
    stop: threading.Event | None = None,
) -> dict[str, list[dict]]:
    """Run ``configs`` through worker processes; the records each one printed, by name.

    A configuration over its cap (counted from its start, or from the worker's for the first
    one) ends the worker and is recorded as slow; a new worker takes the rest. Past ``deadline``,
    or once ``stop`` is set, what is left is recorded as not reached.
    """
    records: dict[str, list[dict]] = {config["name"]: [] for config in configs}
    pending = list(configs)
    log.parent.mkdir(parents=True, exist_ok=True)
    while pending:
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            for config in pending:
                records[config["name"]].append({"skipped": "not reached in the part's time"})
            break
        with log.open("a") as handle:
            process = subprocess.Popen(
                command(pending), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                stderr=handle, text=True, start_new_session=True,
            )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
        current, since, started_any = None, time.monotonic(), False
        while pending:
            config = next(c for c in pending if c["name"] == current) if current else pending[0]
            limit = min(deadline, since + cap(config))
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                stopped = stop is not None and stop.is_set()
                if time.monotonic() < limit and not stopped:
                    continue
                _kill(process)
                if stopped:
                    reason = "stopped"
                elif limit < since + cap(config):
                    reason = f"the part's time ran out after {limit - since:.0f} s"
                else:
                    reason = f"over its {cap(config):.0f} s cap"
                records[config["name"]].append({"slow": reason})
                pending.remove(config)
                break
            if line is None:  # the worker ended before its last configuration was done
                error = {"error": f"exit {process.wait()}: {last_line(log)}"}
                # Inside a configuration: go on without it. Before any: the next would fail alike.
                failed = [config] if started_any else pending
                for config in failed:
                    records[config["name"]].append(error)
                pending = [c for c in pending if c not in failed]
                break
            message = _parse(line)
            if "start" in message:
                current, since, started_any = message["start"], time.monotonic(), True
            elif "result" in message:
                records[message["result"]["name"]].append(message["result"])
            elif "done" in message:
                pending = [c for c in pending if c["name"] != message["done"]]
                current = None
        else:  # every configuration is done
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(process)
    return records


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _parse(line: str) -> dict:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return {}  # a library printing to stdout
    return message if isinstance(message, dict) else {}


def failure(records: list[dict]) -> tuple[str, str] | None:
    """(status, why) when a configuration did not produce its measurement."""
    for record in records:
        for key, status in (("error", "ERROR"), ("slow", "SLOW"), ("skipped", "SKIP")):
            if key in record:
                return status, record[key]
    return None if records else ("ERROR", "no result")


def compile_note(ctx: Context, config: dict) -> str:
    records = ctx.warmed.get(config["name"], [])
    if failure(records) or not config.get("compile"):
        return ""
    return f"compiled in the background: first call {max(r['first_call_s'] for r in records):.0f} s"


# ---- a: the suite's CUDA tests -----------------------------------------------------------------


def part_tests(ctx: Context) -> list[Row]:
    paths = sorted((REPO / "tests").rglob("test_*.py"))
    files = [str(path.relative_to(REPO)) for path in paths if "cuda" in path.read_text()]
    junit, log = ctx.out / "tests.xml", ctx.log("tests")
    argv = [sys.executable, "-m", "pytest", *files, "-k", "cuda", "-q", "-p", "no:cacheprovider"]
    # A file that fails to import is one error; the other files' tests still run.
    options = ["--continue-on-collection-errors", f"--junitxml={junit}"]
    status = run_logged([*argv, *options], ctx.remaining(), log)
    row = Row("a", "pytest -k cuda " + " ".join(files))
    if status is None or not junit.exists():
        row.status = "SLOW" if status is None else "ERROR"
        row.detail = f"{'out of time' if status is None else f'exit {status}'}: {last_line(log)}"
        return [row]
    outcomes: dict[str, list[str]] = {k: [] for k in ("passed", "failure", "error", "skipped")}
    no_gpu, other_skips = [], set()
    for case in ElementTree.parse(junit).iter("testcase"):
        test = "::".join(filter(None, [case.get("classname"), case.get("name")]))
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            outcomes["passed"].append(test)
            continue
        # pytest's "E" lines say what went wrong ("collection failure" alone does not).
        raised = [line[1:] for line in (outcome.text or "").splitlines() if line.startswith("E ")]
        message = " ".join((raised[-1] if raised else outcome.get("message", "")).split())[:200]
        outcomes[outcome.tag].append(f"{test}: {message}")
        if outcome.tag == "skipped" and NO_GPU_SKIP.search(message):
            no_gpu.append(test)
        elif outcome.tag == "skipped":
            other_skips.add(message)
    words = {"passed": "passed", "failure": "failed", "error": "errors", "skipped": "skipped"}
    row.numbers = {f"tests {words[kind]}": len(tests) for kind, tests in outcomes.items()}
    row.result = ", ".join(f"{len(tests)} {words[kind]}" for kind, tests in outcomes.items())
    row.result += f" ({len(no_gpu)} for lack of a GPU)"
    broken = outcomes["failure"] + outcomes["error"]
    if broken:
        row.status, row.detail = "FAIL", "; ".join(broken[:3]) + (" ..." if broken[3:] else "")
    elif ctx.plan.dry_run:
        row.status, row.detail = "SKIP", "dry run: no GPU, so the CUDA tests skip"
    else:
        row.status = "PASS" if outcomes["passed"] and not no_gpu else "FAIL"
    if other_skips:
        row.detail = joined(row.detail, "other skips: " + "; ".join(sorted(other_skips)))
    return [row]


# ---- b: training -------------------------------------------------------------------------------


def training_configs(plan: Plan) -> list[dict]:
    # In the order that the time left for compiled ones should go.
    impls = {
        "densenet121": ("ours", "tv", "ours-me", "timm", "tv-me"),
        "bc250": ("ours", "ours-me"),
    }
    configs = []
    for compiled in plan.train_modes:  # every eager measurement before any compilation
        for model, names in impls.items():
            batch, size = plan.train[model]
            arch = plan.dn121 if model == "densenet121" else plan.bc250
            for impl in names:
                name = f"{MODELS[model]} train: {IMPLS[impl]}, {'compile' if compiled else 'eager'}"
                configs.append(dict(
                    name=name, kind="train", model=model, impl=impl, compile=compiled, arch=arch,
                    batch=batch, size=size, steps=plan.steps, windows=plan.windows,
                ))  # fmt: skip
    return configs


def part_training(ctx: Context) -> list[Row]:
    configs = training_configs(ctx.plan)
    records = ctx.measure(configs, "train")
    found = {}  # (model, impl, compiled): the measurement
    for config in configs:
        if not failure(records[config["name"]]):
            found[config["model"], config["impl"], config["compile"]] = records[config["name"]][0]
    rows = []
    for config in configs:
        model, compiled = config["model"], config["compile"]
        row = Row("b", config["name"], ours=config["impl"].startswith("ours"))
        row.detail = compile_note(ctx, config)
        problem = failure(records[config["name"]])
        if problem:
            row.status, row.detail = problem[0], joined(problem[1], row.detail)
        else:
            reference = found.get((model, "tv" if model == "densenet121" else "ours", compiled))
            row.numbers = _training_numbers(found[model, config["impl"], compiled], reference)
            row.result = _training_text(row.numbers)
        rows.append(row)
    for model in MODELS:
        for compiled in ctx.plan.train_modes:
            rows += _training_targets(ctx, found, model, compiled)
    return rows


def _training_numbers(record: dict, reference: dict | None) -> dict:
    numbers = {key: record[key] for key in ("img_per_s", "peak_gb") if key in record}
    if reference:
        numbers["speed_ratio"] = record["img_per_s"] / reference["img_per_s"]
        if "peak_gb" in record:
            numbers["memory_ratio"] = record["peak_gb"] / reference["peak_gb"]
    return numbers


def _training_text(numbers: dict) -> str:
    text = f"{numbers['img_per_s']:.0f} img/s"
    if "speed_ratio" in numbers:
        text += f" ({numbers['speed_ratio']:.2f}x)"
    if "peak_gb" in numbers:
        text += f", {numbers['peak_gb']:.2f} GB peak"
    if "memory_ratio" in numbers:
        text += f" ({numbers['memory_ratio']:.2f}x)"
    return text


def _training_targets(ctx: Context, found: dict, model: str, compiled: bool) -> list[Row]:
    # BC L=250 has no torchvision or timm twin: its memory-efficient path is held to our standard.
    reference_impl = "tv" if model == "densenet121" else "ours"
    reference = found.get((model, reference_impl, compiled))
    rows = []
    for impl, memory in [("ours-me", 0.5)] + ([("ours", None)] if model == "densenet121" else []):
        wanted = ">= 1.0x the speed" + (f" at <= {memory}x the peak memory" if memory else "")
        mode = "compile" if compiled else "eager"
        check = f"target {MODELS[model]}, {mode}: {IMPLS[impl]} {wanted} of {IMPLS[reference_impl]}"
        row = Row("b", check, "SKIP", detail="a measurement is missing", ours=False)
        record = found.get((model, impl, compiled))
        if record and reference:
            row.numbers = _training_numbers(record, reference)
            row.result, row.detail = _training_text(row.numbers), ""
            ok = row.numbers["speed_ratio"] >= 1.0
            if memory is None:
                row.status = ctx.judged(ok)
            elif "memory_ratio" in row.numbers:
                row.status = ctx.judged(ok and row.numbers["memory_ratio"] <= memory)
            else:
                row.detail = "no CUDA memory statistics"
        rows.append(row)
    return rows


# ---- c: inference ------------------------------------------------------------------------------


def inference_configs(plan: Plan) -> list[dict]:
    configs = []
    for impl, compiled in [("tv", 0), ("ours-ofi", 0), ("ours-ofi", 1), ("timm", 1), ("tv", 1)]:
        name = f"DenseNet-121 inference: {IMPLS[impl]}, {'compile' if compiled else 'eager'}"
        configs.append(dict(
            name=name, kind="infer", impl=impl, compile=bool(compiled), arch=plan.dn121,
            size=plan.train["densenet121"][1], batches=plan.infer_batches,
            calls=plan.infer_calls, windows=plan.windows,
        ))  # fmt: skip
    return configs


def part_inference(ctx: Context) -> list[Row]:
    configs = inference_configs(ctx.plan)
    records = ctx.measure(configs, "infer")
    speed, rows = {}, []  # speed: (impl, compiled): {batch: img/s}
    for config in configs:
        found = records[config["name"]]
        by_batch = speed[config["impl"], config["compile"]] = {
            r["batch"]: r["img_per_s"] for r in found if "img_per_s" in r
        }
        problem = failure([r for r in found if "img_per_s" not in r]) or ("ERROR", "no result")
        for batch in ctx.plan.infer_batches:
            row = Row("c", f"{config['name']}, batch {batch}", ours=config["impl"] == "ours-ofi")
            row.detail = compile_note(ctx, config)
            if batch in by_batch:
                row.numbers = {"img_per_s": by_batch[batch], "batch": batch}
                row.result = f"{by_batch[batch]:.0f} img/s"
            else:
                row.status, row.detail = problem[0], joined(problem[1], row.detail)
            rows.append(row)
    timm = speed[("timm", True)]
    for batch in ctx.plan.infer_batches:
        row = Row("c", f"target inference, batch {batch}: ours >= timm compiled", ours=False)
        ours = {
            mode: speed["ours-ofi", mode == "compile"].get(batch) for mode in ("compile", "eager")
        }
        ours = {mode: value for mode, value in ours.items() if value}
        if ours and batch in timm:
            best = max(ours, key=ours.__getitem__)
            ratio = ours[best] / timm[batch]
            row.status = ctx.judged(ratio >= 1.0)
            row.numbers = {"speed_ratio": ratio, "batch": batch}
            row.result = f"{ratio:.2f}x (optimize_for_inference, {best})"
        else:
            row.status, row.detail = "SKIP", "a measurement is missing"
        rows.append(row)
    return rows


# ---- d: `densenet train` on cuda, under torchrun, and DDP through NCCL -------------------------


def part_cli(ctx: Context) -> list[Row]:
    plan, rows, runs = ctx.plan, [], ctx.out / "runs"
    train = ["-m", "densenet", "train", "--no-progress", *plan.train_args]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    launches = {"densenet train": [], "torchrun --nproc_per_node 1 densenet train": torchrun}
    for name, launcher in launches.items():
        out = runs / name.split()[0]
        row, log = Row("d", f"{name} {' '.join(plan.train_args)}"), ctx.log(out.name)
        rows.append(row)
        if plan.dry_run and launcher:
            row.status, row.detail = "SKIP", "skipped in dry run: its point is NCCL on a GPU"
            continue
        begin = time.monotonic()
        argv = [sys.executable, *launcher, *train, "--out", str(out)]
        status = run_logged(argv, min(ctx.remaining(), 90), log)
        seconds = time.monotonic() - begin
        if status is None:
            row.status, row.detail = "SLOW", f"out of time after {seconds:.0f} s"
        elif status != 0 or not (out / "metrics.csv").exists():
            row.status, row.detail = "FAIL", f"exit {status}: {last_line(log)}"
        else:
            with (out / "metrics.csv").open() as handle:
                last = list(csv.DictReader(handle))[-1]
            top1 = float(last["test_top1"])
            row.status, row.numbers = "PASS", {"test_top1": top1, "seconds": seconds}
            row.result = f"test top-1 {top1:.1f}% after epoch {last['epoch']}, {seconds:.0f} s"
        if launcher:  # densenet starts no process group for one process (training/distributed.py)
            row.detail = joined(row.detail, "world size 1: no process group; see the DDP row")
    return [*rows, _ddp_row(ctx)]


def _ddp_row(ctx: Context) -> Row:
    plan = ctx.plan
    name = f"DDP through NCCL, world size 1: 2 steps of {MODELS['bc250']} memory_efficient"
    batch, size = plan.train["bc250"]
    config = dict(name=name, kind="ddp", model="bc250", arch=plan.bc250, batch=batch, size=size)
    records = ctx.supervise([config], "ddp")[name]
    problem = failure(records)
    if problem:
        return Row("d", name, problem[0], detail=problem[1])
    record = records[0]
    # With one process the all-reduce changes nothing: DDP's updates are plain training's.
    ok = record["update_difference"] <= 1e-3 and math.isfinite(record["loss"])
    result = f"updates {record['update_difference']:.1e} (relative) from training without DDP"
    if plan.dry_run:
        gloo = "ok" if ok else "FAILED"
        return Row("d", name, "SKIP", result, f"skipped in dry run; the same through gloo: {gloo}")
    numbers = {"update_difference": record["update_difference"]}
    return Row("d", name, "PASS" if ok else "FAIL", result, numbers=numbers)


# ---- e: the memory-efficient path computes what the standard one does --------------------------


def part_equivalence(ctx: Context) -> list[Row]:
    plan, configs = ctx.plan, []
    for model, (batch, size) in plan.equivalence.items():
        arch = plan.dn121 if model == "densenet121" else plan.bc250
        name = f"{MODELS[model]} memory_efficient vs standard"
        configs.append(dict(
            name=name, kind="equivalence", model=model, arch=arch, batch=batch, size=size,
            seeds=plan.seeds,
        ))  # fmt: skip
    records = ctx.supervise(configs, "equivalence")
    rows = []
    for config in configs:
        sizes = f"batch {config['batch']}, {config['size']} px, seeds: {config['seeds']}"
        for record in records[config["name"]]:
            if "precision" not in record:
                status, why = failure([record])
                rows.append(Row("e", config["name"], status, detail=why))
                continue
            errors = ", ".join(f"{key} {value}" for key, value in record["errors"].items())
            rows.append(Row(
                "e", f"{config['name']}, {record['precision']}, {sizes}",
                ctx.judged(record["ok"]),
                f"worst: {record['worst']}, {record['worst_ratio']:.2f}x the standard's error",
                f"error vs float64, standard / memory-efficient: {errors}",
                {"worst_ratio": record["worst_ratio"]},
            ))  # fmt: skip
    return rows


# ---- the run -----------------------------------------------------------------------------------


def warm(ctx: Context, stop: threading.Event) -> None:
    """Compile every compiled configuration of c and b once, in parallel workers."""
    plan = ctx.plan
    compiled = [c for c in inference_configs(plan) + training_configs(plan) if c["compile"]]

    def cap(config: dict) -> float:
        return 2 * plan.compile_cap  # it shares the machine with the other parts

    def one_worker(share: list[dict], index: int) -> None:
        found = ctx.supervise(share, f"warm{index}", job={"warm_only": True}, cap=cap, stop=stop)
        ctx.warmed.update(found)

    with ThreadPoolExecutor(plan.warmers) as pool:
        for index in range(plan.warmers):
            pool.submit(one_worker, compiled[index :: plan.warmers], index)


PARTS = {
    "a": ("a. CUDA tests", part_tests),
    "b": ("b. training", part_training),
    "c": ("c. inference", part_inference),
    "d": ("d. densenet train, DDP", part_cli),
    "e": ("e. memory-efficient = standard", part_equivalence),
}


def run_part(ctx: Context, key: str) -> list[Row]:
    label, part = PARTS[key]
    begin = time.monotonic()
    try:
        rows = part(ctx)
    except Exception as error:  # this part is reported broken; the others run
        rows = [Row(key, label, "ERROR", detail=f"{type(error).__name__}: {error}")]
    lines = [f"{label} ({time.monotonic() - begin:.0f} s)"]
    for row in rows:
        row.part = label
        problem = row.detail if row.status in ("ERROR", "FAIL", "SLOW") else ""
        lines.append(f"  {row.status or '-':<5} {row.check}: {joined(row.result, problem)}")
    print("\n".join(lines), flush=True)
    return rows


def run_parts(ctx: Context, chosen: str, budget: float) -> list[Row]:
    """a, d and e side by side with the background compilation; then c and b, alone."""
    plan, started = ctx.plan, time.monotonic()
    checks, timed = [k for k in "ade" if k in chosen], [k for k in "cb" if k in chosen]
    rows: dict[str, list[Row]] = {}
    stop = threading.Event()
    with ThreadPoolExecutor(len(checks) + 1) as pool:
        ctx.deadline = started + (plan.checks_cap if timed else budget)
        warming = pool.submit(warm, ctx, stop) if timed and checks else None
        running = {key: pool.submit(run_part, replace(ctx), key) for key in checks}
        rows.update({key: future.result() for key, future in running.items()})
        if warming:
            wait([warming], timeout=ctx.remaining())
            stop.set()  # nothing may compile while c and b time
    end = started + budget
    for key in timed:
        # c has a cap of its own; what it leaves goes to b.
        ctx.deadline = min(end, time.monotonic() + plan.inference_cap) if key == "c" else end
        rows[key] = run_part(ctx, key)
    return [row for key in sorted(rows) for row in rows[key]]


def machine(plan: Plan) -> list[str]:
    import torch

    from densenet.tools.bench import machine_description

    device = torch.device(plan.device)
    lines = list(machine_description(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError) as error:
            driver = f"unknown ({error})"
        lines.insert(1, (
            f"CUDA capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
            f"driver {driver.strip()}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        ))  # fmt: skip
    else:
        lines.insert(0, "no GPU: dry run on the CPU, tiny sizes, 'compile' runs eagerly")
    modules = ("timm", "tomli_w", "safetensors", "onnxruntime", "onnx", "onnxscript", "torchao")
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    lines.append(f"{os.cpu_count()} CPUs; Python modules missing: {', '.join(missing) or 'none'}")
    return lines


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "| part | check | status | result | detail |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row.part, row.check, row.status or "-", row.result, row.detail]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path, machine_text: str, command: str) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row.numbers))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["part", "check", "status", "result", "detail", *keys, "machine", "command"]
        )
        for row in rows:
            cells = [row.part, row.check, row.status, row.result, row.detail]
            numbers = [row.numbers.get(key, "") for key in keys]
            writer.writerow([*cells, *numbers, machine_text, command])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes")
    parser.add_argument("--parts", default="abcde", help="some of the parts, e.g. bc for a rerun")
    # 8 minutes less what starting, CUDA's initialisation and the report take.
    parser.add_argument("--budget", type=float, default=440, help="seconds for all the parts")
    args = parser.parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if plan.dry_run:
        # Its processes share a small CPU: one thread each rather than spinning pairs.
        os.environ["OMP_NUM_THREADS"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    words = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=src python benchmarks/gpu_check.py " + shlex.join(words)
    begin = time.monotonic()
    if not plan.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here (--dry-run runs the same on the CPU)", file=sys.stderr)
            return 2
    lines = machine(plan)
    print("\n".join(lines), flush=True)
    rows = run_parts(Context(plan, args.out), args.parts, args.budget)
    header = [
        "# CUDA check" + (" (dry run: CPU, tiny sizes, nothing judged)" if plan.dry_run else ""),
        "",
        *(f"- {line}" for line in lines),
        f"- command: `{command}`",
        f"- {time.monotonic() - begin:.0f} s. Training and inference: bf16 autocast, channels_last;"
        f" img/s timed with CUDA events after warm-up, the median of {plan.windows} windows; peak"
        " = torch.cuda.max_memory_allocated over the timed steps; (x): against torchvision (BC"
        " L=250: against ours standard), same mode",
    ]
    table = markdown(rows, header)
    (args.out / "gpu_check.md").write_text(table)
    write_csv(rows, args.out / "gpu_check.csv", "; ".join(lines), command)
    print("\n" + table)
    return 1 if any(row.ours and row.status in ("FAIL", "ERROR") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
