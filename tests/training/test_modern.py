"""The options beyond the paper's recipe: cosine schedule with warm-up, AdamW, no decay on
BatchNorm and biases, label smoothing, gradient accumulation and clipping, a weight average (EMA),
mixup and cutmix."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from architectures import DIGITS, TINY_TRAIN_FLAGS
from densenet import create_model
from densenet.cli import main
from densenet.data import loaders
from densenet.data.erasing import erase_batch
from densenet.data.loaders import Batch, Normalize, mix_seed
from densenet.data.mixing import mix_batch, mixed_targets
from densenet.training import loop
from densenet.training.config import TrainConfig, load_config
from densenet.training.ema import WeightAverage
from densenet.training.loop import clip_gradients, train_step
from densenet.training.setup import Learner, build_criterion, build_optimizer
from killing import assert_identical_runs, killed_and_resumed, read_metrics

FP32 = dict(precision="fp32", memory_format="contiguous", device="cpu")


def test_cosine_schedule_with_warmup_follows_its_formula_per_step():
    config = TrainConfig(schedule="cosine", warmup_epochs=2, epochs=10, lr=0.5)
    per_epoch, warmup, total = 7, 14, 70
    for update in (0, 6, 13, 14, 30, 50, 69):
        ramp = min(1, (update + 1) / warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * max(update - warmup, 0) / (total - warmup)))
        assert config.lr_factor(update, per_epoch) == pytest.approx(ramp * cosine)
    assert config.lr_factor(13, per_epoch) == 1.0  # the warm-up ends at the peak
    # The paper's step schedule is unchanged: constant within an epoch, lr_at between them.
    step = TrainConfig(epochs=10)
    factors = [step.lr_factor(u, per_epoch) for u in range(total)]
    assert factors == [step.lr_at(u // per_epoch) / step.lr for u in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_a_warmup_longer_than_half_the_run_is_capped_at_half_of_it(schedule):
    # 4 epochs of 5 optimizer steps: a 3-epoch warm-up is shortened to 2 epochs (10 steps).
    capped = TrainConfig(schedule=schedule, warmup_epochs=3, epochs=4, lr_milestones=(0.75,))
    assert (capped.warmup_epochs, capped.warmup_epochs_used) == (3, 2)
    decayed = 0.5 * (1 + math.cos(math.pi * 4 / 10)) if schedule == "cosine" else 1.0
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 14: decayed}
    assert {u: capped.lr_factor(u, 5) for u in expected} == pytest.approx(expected)
    # Within the cap the warm-up is the one asked for: 1 epoch, 5 steps.
    kept = TrainConfig(schedule=schedule, warmup_epochs=1, epochs=4, lr_milestones=(0.75,))
    assert kept.warmup_epochs_used == 1
    decayed = 0.5 * (1 + math.cos(math.pi * 7 / 15)) if schedule == "cosine" else 1.0
    expected = {0: 0.2, 4: 1.0, 12: decayed}
    assert {u: kept.lr_factor(u, 5) for u in expected} == pytest.approx(expected)
    # Exactly half the run is not shortened.
    assert TrainConfig(warmup_epochs=2, epochs=4).warmup_epochs_used == 2


def test_a_one_epoch_run_shortens_a_one_epoch_warmup_and_says_so(tmp_path, capsys):
    # The digits recipe's own warm-up (cosine, 1 epoch): `densenet train --epochs 1` works.
    args = ["--epochs", "1", *TINY_TRAIN_FLAGS]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", "--precision", "fp32", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("warm-up shortened to 0.5 epochs for a 1-epoch run")
    # The run keeps the value asked for; only the schedule shortens it (22 steps of 64).
    assert "warmup_epochs = 1.0" in (run / "config.toml").read_text()
    config = TrainConfig(epochs=1, schedule="cosine", warmup_epochs=1)
    assert float(read_metrics(run)[0]["lr"]) == pytest.approx(0.1 * config.lr_factor(21, 22))


def test_a_run_sets_the_scheduled_lr_at_every_optimizer_step(tmp_path, monkeypatch, capsys):
    # 5 batches of 256 an epoch, an optimizer step every 2: steps after batches 2, 4 and 5.
    seen = []
    step = loop.optimizer_step

    def recording(learner, config):
        seen.append(learner.optimizer.param_groups[-1]["lr"])
        step(learner, config)

    monkeypatch.setattr(loop, "optimizer_step", recording)
    args = ["--epochs", "2", "--batch-size", "256", "--accumulate", "2", "--schedule", "cosine"]
    args += ["--warmup-epochs", "1", "--lr", "0.2", *TINY_TRAIN_FLAGS, "--precision", "fp32"]
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *args]) == 0
    config = TrainConfig(epochs=2, lr=0.2, schedule="cosine", warmup_epochs=1, accumulate=2)
    assert seen == pytest.approx([0.2 * config.lr_factor(u, 3) for u in range(6)])
    assert "effective batch 512" in capsys.readouterr().out.splitlines()[0]
    rows = read_metrics(tmp_path / "run")
    assert [float(row["lr"]) for row in rows] == pytest.approx([seen[2], seen[5]])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_decay_bn_bias_puts_batchnorm_and_biases_in_zero_decay_groups(optimizer):
    model = create_model("densenet_bc100_k12", block_config=(1, 1, 1), growth_rate=4)
    config = TrainConfig(optimizer=optimizer, weight_decay=0.05, decay_bn_bias=False)
    built = build_optimizer(config, model)
    assert type(built).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[optimizer]
    decay_of = {id(p): g["weight_decay"] for g in built.param_groups for p in g["params"]}
    assert len(decay_of) == sum(len(g["params"]) for g in built.param_groups)  # each once
    exempt = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    exempt |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    for name, parameter in model.named_parameters():
        assert decay_of[id(parameter)] == (0.0 if id(parameter) in exempt else 0.05), name
    # By default every parameter decays, as in the paper.
    default = build_optimizer(TrainConfig(optimizer=optimizer, weight_decay=0.05), model)
    assert {g["weight_decay"] for g in default.param_groups} == {0.05}


def test_adamw_needs_no_momentum():
    assert TrainConfig(optimizer="adamw", momentum=0.0).momentum == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_is_cross_entropy_with_smoothed_targets(smoothing):
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    criterion = build_criterion(TrainConfig(label_smoothing=smoothing))
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    assert torch.allclose(criterion(logits, labels), expected)


def tiny_learner(**settings):
    torch.manual_seed(0)
    model = create_model("densenet_bc100_k12", **DIGITS, num_classes=10).eval()
    config = TrainConfig(lr=0.1, **FP32, **settings)
    optimizer = build_optimizer(config, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return Learner(model, build_criterion(config), optimizer, schedule, scaler), config


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def test_accumulating_micro_batches_gives_the_gradient_of_the_whole_batch():
    # BatchNorm in eval mode: the loss of a batch is then the mean of its images' losses.
    learner, config = tiny_learner(accumulate=3)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    normalize = Normalize((0.3,), (0.4,))

    def backward(index, share):
        batch = Batch(images[index], labels[index])
        train_step(learner.model, learner, batch, config, normalize, 0, False, share, False)

    for part in torch.arange(12).split(4):
        backward(part, 1 / 3)
    accumulated = gradients(learner.model)
    learner.optimizer.zero_grad(set_to_none=True)
    backward(torch.arange(12), 1.0)
    whole = gradients(learner.model)
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(accumulated, whole, strict=True))


def test_clipping_bounds_the_total_gradient_norm_and_keeps_its_direction():
    model = create_model("densenet_bc100_k12", **DIGITS, num_classes=10)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 100
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(clip_gradients(model, 1.5)) == pytest.approx(float(before.norm()))
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(after.norm()) == pytest.approx(1.5, rel=1e-4)
    assert torch.allclose(after / after.norm(), before / before.norm(), atol=1e-6)
    clip_gradients(model, 10.0)  # already within the bound: untouched
    assert torch.equal(torch.cat([p.grad.flatten() for p in model.parameters()]), after)


def test_the_weight_average_follows_its_closed_form():
    decay = 0.8
    model = create_model("densenet_bc100_k12", **DIGITS, num_classes=10)
    ema = WeightAverage(model, decay)
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(3):
        with torch.no_grad():
            for value in model.state_dict().values():
                value.add_(torch.randn_like(value) if value.is_floating_point() else 1)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    # After t updates: decay^t w0 + sum over i of (1 - decay) decay^(t - i) wi.
    for name, value in ema.model.state_dict().items():
        if value.is_floating_point():
            expected = decay**3 * states[0][name] + sum(
                (1 - decay) * decay ** (3 - i) * states[i][name] for i in (1, 2, 3)
            )
            assert torch.allclose(value, expected, atol=1e-5), name
        else:
            assert torch.equal(value, states[3][name]), name


def test_mixup_blends_each_image_with_its_partner_by_the_recorded_share():
    images = torch.randn(6, 3, 8, 8)
    mixed = mix_batch(images, 0.4, 0.0, seed=7)
    assert mixed.box is None and 0 <= mixed.lam <= 1
    partner = images.flip(0)
    assert torch.allclose(mixed.images, mixed.lam * images + (1 - mixed.lam) * partner)
    assert mix_batch(images, 0.4, 0.0, seed=7).lam == mixed.lam  # a function of the seed
    targets = mixed_targets(torch.tensor([0, 1, 2, 3, 4, 5]), mixed.lam, 10)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert targets[0, 0] == pytest.approx(mixed.lam) and targets[0, 5] == pytest.approx(
        1 - mixed.lam
    )


def test_cutmix_pastes_a_box_of_the_partner_and_records_its_share():
    images = torch.randn(6, 3, 16, 16)
    for seed in range(5):
        mixed = mix_batch(images, 0.0, 1.0, seed=seed)
        y0, y1, x0, x1 = mixed.box
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(mixed.images[..., inside], images.flip(0)[..., inside])
        assert torch.equal(mixed.images[..., ~inside], images[..., ~inside])
        assert mixed.lam == pytest.approx(1 - int(inside.sum()) / 256)
    # With both, each batch takes one of them.
    kinds = {mix_batch(images, 0.4, 1.0, seed=s).box is None for s in range(20)}
    assert kinds == {True, False}


def test_a_training_step_erases_its_normalised_batch_with_the_step_seed():
    images = torch.randint(1, 256, (12, 1, 8, 8), dtype=torch.uint8)
    batch, normalize = Batch(images, torch.randint(0, 10, (12,))), Normalize((0.0,), (1.0,))

    def network_input(**settings):
        learner, config = tiny_learner(**settings)
        seen = []
        recording = lambda x: seen.append(x) or learner.model(x)  # noqa: E731
        train_step(recording, learner, batch, config, normalize, 7, False, 1.0, False)
        return seen[0]

    assert torch.equal(network_input(), normalize(images))
    expected = erase_batch(normalize(images), 0.5, mix_seed(7, 4))
    assert torch.equal(network_input(random_erasing=0.5), expected)
    assert not torch.equal(expected, normalize(images))


def test_train_runs_with_auto_augment_and_random_erasing(tmp_path, monkeypatch):
    calls = {"augment_each": 0, "erase_batch": 0}

    def counted(module, name):
        function = getattr(module, name)

        def counting(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)

    counted(loaders, "augment_each")
    counted(loop, "erase_batch")
    run = tmp_path / "run"
    args = ["--epochs", "1", "--batch-size", "256", "--auto-augment", "randaugment"]
    args += ["--random-erasing", "0.25", *TINY_TRAIN_FLAGS, "--precision", "fp32"]
    assert main(["train", "--out", str(run), "--no-progress", *args]) == 0
    assert calls == {"augment_each": 5, "erase_batch": 5}  # every one of the 5 training steps
    saved = load_config(run / "config.toml")
    assert (saved.auto_augment, saved.random_erasing) == ("randaugment", 0.25)


def test_sigkill_and_resume_with_every_modern_option_gives_bitwise_identical_runs(tmp_path):
    # Digits: 5 batches of 256 an epoch, optimizer steps after batches 2, 4 and 5.
    args = [
        *("--epochs", "2", "--batch-size", "256", "--deterministic", "--drop-rate", "0.1"),
        *("--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.05", "--no-decay-bn-bias"),
        *("--schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.1"),
        *("--accumulate", "2", "--clip-grad-norm", "1", "--ema-decay", "0.9"),
        *("--mixup-alpha", "0.2", "--cutmix-alpha", "1"),
        *("--auto-augment", "trivialaugment", "--random-erasing", "0.25"),
        *TINY_TRAIN_FLAGS,
        *("--precision", "fp32", "--no-progress"),
    ]
    # Killed as batch 4 begins: the optimizer stepped after batch 2, and only then was a state
    # saved; batch 3's gradient, accumulated but not applied, is lost and must be redone.
    whole, killed, state = killed_and_resumed(tmp_path, args, 4)
    assert (state["epoch"], state["step"]) == (0, 2) and state["ema"]
    assert_identical_runs(
        whole, killed, ("final.safetensors", "ema.safetensors", "best.safetensors")
    )

    # Each weights file says which weights it holds, and their score.
    rows = read_metrics(whole)
    assert all(row["ema_test_top1"] for row in rows)
    holds = {}
    for name in ("final", "ema", "best"):
        with safe_open(whole / f"{name}.safetensors", "pt") as handle:
            holds[name] = handle.metadata()["meta"]
    assert '"weights": "raw"' in holds["final"] and '"weights": "ema"' in holds["ema"]
    best = max((float(r[c]), c) for r in rows for c in ("test_top1", "ema_test_top1"))
    assert f'"weights": "{"ema" if best[1] == "ema_test_top1" else "raw"}"' in holds["best"]
