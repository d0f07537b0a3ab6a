"""`densenet train --compile` and cuDNN autotuning: what compiling changes, and what it must not."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from architectures import TINY_TRAIN_FLAGS
from conftest import randomize_batchnorm
from densenet import DenseNet, DenseNetConfig
from densenet.cli import main
from densenet.training import loop

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, stem="cifar", num_classes=5)
# Inductor fuses and reorders float32 arithmetic, so the compiled step rounds differently (which
# is why --compile may not change on --resume). The largest relative differences seen here (AVX512)
# were 6e-7 in the logits and 9e-6 in a gradient; 1e-4 leaves room for other CPUs.
TOLERANCE = 1e-4


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return logits.detach(), loss.detach()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["standard", "memory_efficient"])
def test_a_compiled_training_step_equals_the_eager_one(memory_efficient):
    config = DenseNetConfig(memory_efficient=memory_efficient, **TINY)
    eager = randomize_batchnorm(DenseNet(config)).train()
    model = DenseNet(config).train()
    model.load_state_dict(eager.state_dict())
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))

    expected_logits, expected_loss = training_step(eager, x, labels)
    logits, loss = training_step(torch.compile(model), x, labels)

    assert relative_error(logits, expected_logits) <= TOLERANCE
    assert relative_error(loss, expected_loss) <= TOLERANCE
    reference = dict(eager.named_parameters())
    for name, parameter in model.named_parameters():
        assert relative_error(parameter.grad, reference[name].grad) <= TOLERANCE, name
    # BN's running statistics are updated once, as in the eager step.
    for name, buffer in eager.named_buffers():
        assert relative_error(model.get_buffer(name).float(), buffer.float()) <= TOLERANCE, name


def test_train_compile_prints_the_compile_time_and_saves_the_plain_names(tmp_path, capsys):
    run = tmp_path / "run"
    # Memory-efficient: it compiles in seconds (see efficient.py), the standard path in tens.
    argv = ["train", "--out", str(run), "--epochs", "1", "--batch-size", "64", "--compile"]
    argv += ["--memory-efficient"]
    assert main([*argv, *TINY_TRAIN_FLAGS, "--precision", "fp32", "--no-progress"]) == 0
    assert "torch.compile took" in capsys.readouterr().out
    # The optimizer's network is saved, not the compiled wrapper (whose names start _orig_mod).
    names = load_file(run / "final.safetensors").keys()
    assert "classifier.weight" in names and not any("_orig_mod" in name for name in names)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_autotuning_is_on_unless_deterministic(tmp_path, monkeypatch, deterministic):
    seen = []
    train_step = loop.train_step

    def recording_step(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    before = torch.backends.cudnn.benchmark
    flags = ["--deterministic" if deterministic else "--no-deterministic", *TINY_TRAIN_FLAGS]
    argv = ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "512"]
    assert main([*argv, *flags, "--precision", "fp32", "--no-progress"]) == 0
    assert seen and set(seen) == {not deterministic}
    assert torch.backends.cudnn.benchmark == before  # restored after training
