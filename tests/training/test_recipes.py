import pytest

from densenet.errors import ConfigError
from densenet.training.config import (
    TrainConfig,
    check_resume_overrides,
    list_recipes,
    load_config,
    resolve,
    save_config,
)
from densenet.weights.registry import get_spec

PAPER_RECIPES = ["digits", "cifar10", "cifar100", "svhn", "imagenet"]
MODERN_RECIPES = [f"{name}-modern" for name in PAPER_RECIPES]


@pytest.mark.parametrize("name", [*PAPER_RECIPES, *MODERN_RECIPES])
def test_shipped_recipes_are_valid_and_name_real_models(name):
    config = resolve(name, {})
    get_spec(config.model).config.replace(**config.model_overrides)


def test_every_shipped_recipe_is_checked_here():
    assert list_recipes() == sorted([*PAPER_RECIPES, *MODERN_RECIPES])


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_modern_recipes_keep_the_papers_data_and_network(name):
    paper, modern = resolve(name, {}), resolve(f"{name}-modern", {})
    same = ("dataset", "model", "model_overrides", "epochs", "batch_size", "mean", "std")
    assert {key: getattr(modern, key) for key in same} == {key: getattr(paper, key) for key in same}
    assert (modern.schedule, modern.decay_bn_bias, modern.label_smoothing) == ("cosine", False, 0.1)
    assert modern.warmup_epochs > 0 and modern.ema_decay > 0
    # Digits, written or photographed, are never mirrored: a mirrored digit is another symbol.
    if name in ("digits", "svhn"):
        assert "flip" not in modern.augment
        assert modern.mixup_alpha == modern.cutmix_alpha == 0


def test_recipes_hold_the_papers_settings():
    cifar = resolve("cifar10", {})
    assert (cifar.batch_size, cifar.epochs, cifar.lr, cifar.weight_decay) == (64, 300, 0.1, 1e-4)
    assert cifar.nesterov and cifar.momentum == 0.9 and cifar.augment == "crop_flip"
    assert [cifar.lr_at(e) for e in (149, 150, 224, 225)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert cifar.mean[0] * 255 == pytest.approx(125.3, abs=1e-3)
    # None of the later additions: the paper's recipe stays exact.
    assert (cifar.optimizer, cifar.schedule, cifar.warmup_epochs, cifar.decay_bn_bias) == (
        "sgd",
        "step",
        0.0,
        True,
    )
    assert (cifar.label_smoothing, cifar.accumulate, cifar.clip_grad_norm) == (0.0, 1, 0.0)
    assert (cifar.ema_decay, cifar.mixup_alpha, cifar.cutmix_alpha) == (0.0, 0.0, 0.0)
    svhn = resolve("svhn", {})
    assert (svhn.epochs, svhn.drop_rate, svhn.augment, svhn.svhn_extra) == (40, 0.2, "none", True)
    imagenet = resolve("imagenet", {})
    assert (imagenet.batch_size, imagenet.epochs) == (256, 90)
    # torchvision's 2021 recipe at lr 0.5 for batch 1024, scaled to the paper's batch 256.
    assert resolve("imagenet-modern", {}).lr == pytest.approx(0.5 * 256 / 1024)
    assert [imagenet.lr_at(e) for e in (29, 30, 59, 60)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_dataset_picks_its_recipe_and_overrides_win():
    config = resolve(None, {"dataset": "svhn", "epochs": 2, "model_overrides": {"growth_rate": 6}})
    assert (config.dataset, config.epochs, config.drop_rate) == ("svhn", 2, 0.2)
    assert config.model_overrides == {"growth_rate": 6}
    assert resolve(None, {}).dataset == "digits"
    # `densenet train`: cosine with a 1-epoch warm-up (benchmarks/results/train_digits.md).
    digits = resolve(None, {})
    assert (digits.schedule, digits.warmup_epochs, digits.lr, digits.epochs) == (
        "cosine",
        1,
        0.1,
        20,
    )


def test_a_shipped_name_wins_over_a_folder_of_that_name_here(tmp_path, monkeypatch):
    # A "digits" data folder in the working directory must not break `densenet train`.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    assert resolve(None, {}).schedule == "cosine"
    (tmp_path / "mine").write_text('epochs = 3\nschedule = "step"\n')
    assert resolve("./mine", {}).epochs == 3
    with pytest.raises(ConfigError, match="recipe file not found: digits"):
        resolve("./digits", {})


def test_saved_config_round_trips_as_a_recipe(tmp_path):
    config = resolve("digits", {"mean": [0.5], "std": [0.25]})
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
    assert resolve(str(tmp_path / "config.toml"), {}) == config


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": "64"}, "batch_size must be of type int"),
        ({"augment": "mixup"}, "augment must be one of"),
        ({"interpolation": "cubic"}, "interpolation must be one of bilinear, bicubic"),
        ({"precision": 16}, "precision must be of type str"),
        ({"lr_milestones": [150]}, "fractions of the run"),
        ({"lr_milestones": [0.75, 0.5]}, "increasing fractions of the run"),
        ({"lr_milestones": [0.5, 1.0]}, "each in (0, 1), got [0.5, 1.0]"),
        ({"lr_gamma": -1}, "lr_gamma must be in (0, 1], got -1.0"),
        ({"lr_gamma": 10}, "lr_gamma must be in (0, 1]"),
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"momentum": 1}, "momentum must be in [0, 1)"),
        ({"momentum": 0.0}, "nesterov needs momentum > 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be a finite number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0"),
        ({"mean": [float("nan")], "std": [0.5]}, "mean must be finite numbers, got [nan]"),
        ({"mean": [0.5], "std": [float("inf")]}, "std must be finite numbers > 0, got [inf]"),
        ({"mean": [0.5], "std": [0.0]}, "std must be finite numbers > 0"),
        ({"mean": [0.5, 0.5], "std": [0.2]}, "one value per channel each, got 2 and 1"),
        ({"drop_rate": 1.0}, "drop_rate must be in [0, 1)"),
        ({"input_size": 4096}, "input_size must be in [0, 2048] px"),
        ({"resize_size": -1}, "resize_size must be in [0, 2048] px"),
        ({"crop_padding": -1}, "crop_padding must be >= 0"),
        ({"learning_rate": 0.1}, "unknown setting(s) learning_rate"),
        ({"schedule": "linear"}, "schedule must be one of step, cosine"),
        ({"optimizer": "adam"}, "optimizer must be one of sgd, adamw"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a finite number >= 0"),
        ({"label_smoothing": 1}, "label_smoothing must be in [0, 1)"),
        ({"accumulate": 0}, "accumulate must be >= 1"),
        ({"clip_grad_norm": float("inf")}, "clip_grad_norm must be a finite number >= 0"),
        ({"ema_decay": 1}, "ema_decay must be in [0, 1) (0: off)"),
        ({"mixup_alpha": -0.2}, "mixup_alpha must be a finite number >= 0"),
        ({"cutmix_alpha": float("nan")}, "cutmix_alpha must be a finite number >= 0"),
        ({"random_erasing": 1.5}, "random_erasing must be in [0, 1] (0: off)"),
        ({"random_erasing": float("nan")}, "random_erasing must be in [0, 1] (0: off)"),
        (
            {"auto_augment": "autoaugment"},
            "auto_augment must be one of none, randaugment, trivialaugment",
        ),
        ({"model_overrides": {"num_classes": 5}}, "may not set num_classes"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as info:
        resolve("digits", settings)
    assert message in str(info.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        resolve(str(tmp_path / "missing.toml"), {})
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(str(tmp_path / "bad.toml"), {})
    (tmp_path / "latin1.toml").write_bytes('model = "café"'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 12\).*save it as"):
        resolve(str(tmp_path / "latin1.toml"), {})
    (tmp_path / "overrides.toml").write_text("model_overrides = 5")
    with pytest.raises(ConfigError, match=r"model_overrides must be a table .*, got 5"):
        resolve(str(tmp_path / "overrides.toml"), {})
    with pytest.raises(ConfigError, match="unknown recipe 'cifar11'"):
        resolve("cifar11", {})


@pytest.mark.parametrize(
    "epochs, milestones, lrs",
    [
        (1, (0.5, 0.75), [0.1]),  # both would round to epoch 0 or 1
        (2, (0.5, 0.75), [0.1, 0.01]),
        (3, (0.1, 0.2), [0.1, 0.001, 0.001]),
    ],
)
def test_no_milestone_falls_on_the_first_epoch(epochs, milestones, lrs):
    # The paper's 300 epochs keep theirs at 150 and 225: test_recipes_hold_the_papers_settings.
    config = TrainConfig(epochs=epochs, lr_milestones=milestones)
    assert [config.lr_at(e) for e in range(epochs)] == pytest.approx(lrs)


def test_resume_allows_only_harmless_changes():
    saved = TrainConfig(epochs=5, model="densenet40_k12")
    assert check_resume_overrides(saved, {"workers": 1, "epochs": 5}).workers == 1
    with pytest.raises(ConfigError, match="model 'densenet40_k12' -> 'densenet_bc100_k12'"):
        check_resume_overrides(saved, {"model": "densenet_bc100_k12"})
