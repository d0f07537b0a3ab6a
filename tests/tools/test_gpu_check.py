"""benchmarks/gpu_check.py: its dry run on the CPU, so that the GPU run cannot rot in between."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def load_script():
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_dry_run_writes_every_part_with_machine_and_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "gpu"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "gpu_check.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    labels = [label for label, _ in load_script().PARTS.values()]
    assert sorted({row["part"] for row in rows}) == sorted(labels)
    assert not [row for row in rows if row["status"] == "ERROR"]
    assert all(row["machine"] and "--dry-run" in row["command"] for row in rows)
    # Every measurement came back, and every target was computed (not judged in a dry run).
    assert all(row["result"] for row in rows if row["part"].startswith(("b", "c")))
    markdown = (out / "gpu_check.md").read_text()
    assert all(label in markdown for label in labels) and "command: `" in markdown
    assert (out / "tests.xml").is_file() and (out / "runs" / "densenet" / "metrics.csv").is_file()


FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    for config in json.loads(sys.argv[1]):
        print(json.dumps({"start": config["name"]}), flush=True)
        if config["name"] == "hangs":
            time.sleep(60)
        if config["name"] == "dies":
            print("the last words", file=sys.stderr, flush=True)
            os._exit(3)
        print(json.dumps({"result": {"name": config["name"], "value": 1}}), flush=True)
        print(json.dumps({"done": config["name"]}), flush=True)
    """
)


def test_supervisor_ends_a_configuration_over_its_cap_and_goes_on_without_it(tmp_path):
    gpu_check = load_script()
    configs = [{"name": name} for name in ("first", "hangs", "dies", "last")]
    records = gpu_check.supervise(
        lambda todo: [sys.executable, "-c", FAKE_WORKER, json.dumps(todo)],
        configs, cap=lambda config: 2.0, deadline=math.inf, log=tmp_path / "log",
    )  # fmt: skip
    assert records["first"] == [{"name": "first", "value": 1}]
    assert records["last"] == [{"name": "last", "value": 1}]
    assert records["hangs"] == [{"slow": "over its 2 s cap"}]
    assert records["dies"] == [{"error": "exit 3: the last words"}]


def test_supervisor_records_what_the_deadline_left_unreached(tmp_path):
    gpu_check = load_script()
    records = gpu_check.supervise(
        lambda todo: [sys.executable, "-c", FAKE_WORKER, json.dumps(todo)],
        [{"name": "hangs"}, {"name": "never"}], cap=lambda config: 60.0,
        deadline=gpu_check.time.monotonic() + 2, log=tmp_path / "log",
    )  # fmt: skip
    assert records["hangs"][0]["slow"].startswith("the part's time ran out")
    assert records["never"] == [{"skipped": "not reached in the part's time"}]
