import pytest
import torch

from densenet import native
from densenet.errors import ConfigError
from densenet.hardware import (
    DTYPES,
    PRECISIONS,
    autocast,
    cpu_info,
    resolve_precision_and_format,
    why_precision,
)
from densenet.tools import bench
from densenet.tools.bench import CPU_LIMITS, machine_description, machine_kind

CPU = torch.device("cpu")


def test_every_precision_has_one_dtype_and_autocasts_to_it():
    assert tuple(DTYPES) == PRECISIONS
    for precision in PRECISIONS:
        with autocast(CPU, precision):
            out = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        assert out.dtype == DTYPES[precision]


def test_cpu_info_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: Fast CPU\nflags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other CPU\n"
    )
    info = cpu_info(path)
    assert info["model name"] == "Fast CPU"
    assert info["flags"].split() == ["fpu", "avx2", "amx_bf16"]
    assert cpu_info(tmp_path / "missing") == {}


def test_auto_precision_is_bf16_exactly_where_onednn_has_native_bf16():
    # AVX512_BF16 and AMX CPUs: oneDNN's own query, not /proc/cpuinfo's flag names.
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = "bf16" if native else "fp32"
    assert resolve_precision_and_format(CPU) == (expected, "channels_last")
    reason = why_precision(CPU, expected)
    assert ("has native bf16" if native else "has no native bf16") in reason


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    assert resolve_precision_and_format(CPU) == (expected, "channels_last")


def test_explicit_choices_are_kept():
    assert resolve_precision_and_format(CPU, "fp16", "contiguous") == ("fp16", "contiguous")
    assert resolve_precision_and_format(CPU, "fp32", "auto") == ("fp32", "channels_last")


@pytest.mark.parametrize(
    "precision, memory_format, message",
    [("fp8", "auto", "precision must be one of auto, fp32"), ("fp32", "nhwc", "memory_format")],
)
def test_unknown_choices_are_refused(precision, memory_format, message):
    with pytest.raises(ConfigError, match=message):
        resolve_precision_and_format(CPU, precision, memory_format)


@pytest.mark.parametrize("amx", [True, False])
def test_an_amx_cpu_is_named_in_the_reason_and_the_results_kind(monkeypatch, amx):
    # torch 2.14 answers this query in torch.cpu only; an older place silently said "no AMX".
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert ("with AMX" in why_precision(CPU, "bf16")) is amx
    assert (machine_kind(CPU) == "amx") is amx
    assert ("with AMX" in next(machine_description(CPU))) is amx


def test_a_result_made_under_another_cpus_code_paths_says_so(monkeypatch):
    for name in CPU_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert not any("limited" in line for line in machine_description(CPU))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    lines = list(machine_description(CPU))
    assert any("limited: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in line for line in lines)


def test_a_result_names_the_layer_kernels_that_ran(monkeypatch):
    kinds = {torch.float32: "float", torch.bfloat16: None}
    monkeypatch.setattr(native, "layer_kernels_kind", kinds.get)
    lines = list(machine_description(CPU))
    assert "densenet's layer kernels: fp32 float, bf16 none (oneDNN)" in lines


def test_a_result_names_the_cpus_family_and_model(monkeypatch):
    fields = {"model name": "AMD EPYC", "cpu family": "25", "model": "17"}
    monkeypatch.setattr(bench, "cpu_info", lambda: fields)
    assert next(machine_description(CPU)).startswith("cpu: AMD EPYC (family 25, model 17), ")
