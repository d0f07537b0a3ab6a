"""Multi-label training from CSV files (CheXNet-style: several findings per image, AUROC)."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from sklearn.metrics import average_precision_score, roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from architectures import TINY
from densenet import create_model
from densenet.cli import main
from densenet.data.datasets import load_split
from densenet.data.mixing import mixed_targets
from densenet.deploy.predict import Predictor
from densenet.models.presets import PRESETS
from densenet.training.distributed import all_gather_rows
from densenet.training.evaluate import MultiLabelResult
from densenet.training.metrics import EpochRow
from densenet.training.setup import DataSetup, SmoothedBCEWithLogitsLoss, positive_weights
from densenet.weights.io import save_weights
from densenet.weights.registry import load_for_inference
from fake_data import SHAPES, write_shapes_csv
from killing import read_metrics

# A model and recipe that learn the shapes set to mean AUROC >= 0.95 in about 15 s of training
# on one CPU thread (measured: 1.0 from epoch 8 on).
SHAPES_FLAGS = (
    "--model-override", "block_config=[2,2,2]", "--model-override", "growth_rate=8",
    "--input-size", "32", "--resize-size", "32", "--mean", "0.1", "0.1", "0.1",
    "--std", "0.3", "0.3", "0.3", "--augment", "crop_flip", "--batch-size", "32", "--lr", "0.1",
    "--lr-milestones", "0.75", "--workers", "0", "--precision", "fp32", "--no-progress",
)  # fmt: skip


def csv_args(data, *extra):
    return [
        "train", "--dataset", "csv", "--data-dir", str(data), "--train-csv", "train.csv",
        "--test-csv", "test.csv", "--model", "densenet_bc100_k12", *SHAPES_FLAGS, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a CPU shared with other jobs, intra-op threads spin waiting for each other: the
    training here took 6 minutes with two threads and 18 s with one (two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = tmp_path_factory.mktemp("shapes")
    write_shapes_csv(data)
    return data


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main([*csv_args(shapes, "--epochs", "12", "--out", str(run), "--tensorboard")]) == 0
    return run


def test_a_multilabel_csv_trains_through_the_cli_to_a_high_mean_auroc(trained):
    rows = read_metrics(trained)
    assert list(rows[0]) == [
        "epoch", "train_loss", "test_loss", "test_mean_auroc", "test_mean_ap", "test_mean_f1",
        "lr", "img_per_s", "seconds", "data_share", "skipped_images", "ema_test_mean_auroc",
        *(f"auroc_{kind}" for kind in SHAPES),
    ]  # fmt: skip
    assert rows[0]["ema_test_mean_auroc"] == ""  # no weight average in this run
    assert float(rows[-1]["test_mean_auroc"]) >= 0.95
    means = [float(row["test_mean_auroc"]) for row in rows]
    per_class = np.array([[float(rows[-1][f"auroc_{k}"]) for k in SHAPES]])
    assert means[-1] == pytest.approx(per_class.mean(), abs=1e-5)
    assert (trained / "best.safetensors").is_file() and (trained / "curves.png").is_file()


def test_a_multilabel_run_logs_its_ranking_columns_to_tensorboard(trained):
    events = EventAccumulator(str(trained / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/test_mean_auroc", *(f"epoch/auroc_{kind}" for kind in SHAPES)} <= tags
    assert "step/train_loss" in tags and "step/train_top1" not in tags  # no top-1 here
    aurocs = [s.value for s in events.Scalars("epoch/test_mean_auroc")]
    assert aurocs == pytest.approx([float(r["test_mean_auroc"]) for r in read_metrics(trained)])


def test_project_metrics_equal_scikit_learns_on_the_same_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, (200, 4))
    labels[:, 3] = 1  # a class without negatives has no ROC curve
    scores = np.clip(labels * 0.3 + rng.random((200, 4)), 0, 1)
    result = MultiLabelResult(0.0, scores, labels)
    for c in range(3):
        assert result.per_class_auroc[c] == roc_auc_score(labels[:, c], scores[:, c])
        assert result.per_class_ap[c] == average_precision_score(labels[:, c], scores[:, c])
    assert np.isnan(result.per_class_auroc[3])
    assert result.mean_auroc == pytest.approx(result.per_class_auroc[:3].mean())


def write_csv(data, name, text):
    (data / name).write_text(text)
    return name


@pytest.mark.parametrize(
    ("train_text", "extra", "message"),
    [
        ("path,square,disc\nimages/train0.png,1\n", (), "line 2 has 2 fields, the header 3"),
        ("path,square,disc\nimages/train0.png,1,2\n", (), "line 2: column 'disc' is '2'"),
        ("path,square,disc\nimages/nowhere.png,1,0\n", (), "line 2: image"),
        ("path\nimages/train0.png\n", (), "add a label column"),
        ("path,square,disc\nimages/train0.png,1,0\n", ("--task", "single"), "--task single"),
        (
            "path,square,disc,cross\nimages/train0.png,1,0,0\nimages/train1.png,1,1,0\n",
            ("--pos-weight", "auto"),
            "class 'cross' has no positive image",
        ),
    ],
)
def test_bad_csv_input_is_one_line_naming_the_row_and_leaves_no_run(
    shapes, tmp_path, capsys, train_text, extra, message
):
    write_csv(shapes, "bad.csv", train_text)
    run = tmp_path / "run"
    argv = [*csv_args(shapes, "--out", str(run), *extra)]
    argv[argv.index("train.csv")] = "bad.csv"
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not run.exists()


def test_csv_settings_come_together_and_multilabel_needs_a_csv(shapes, tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", "--dataset", "csv", "--data-dir", str(shapes), "--out", run]
    assert main(argv) == 2
    assert "--train-csv and --test-csv" in capsys.readouterr().err
    assert main(["train", "--task", "multilabel", "--out", run]) == 2
    assert "--dataset csv" in capsys.readouterr().err


def test_predict_gives_each_finding_its_sigmoid_and_the_run_auroc_is_scikit_learns(trained, shapes):
    loaded = load_for_inference(trained / "final.safetensors")
    assert loaded.multilabel and loaded.class_names == list(SHAPES)
    predictor = Predictor(loaded.model, loaded.preprocessing, loaded.class_names, multilabel=True)
    with open(shapes / "test.csv") as handle:
        rows = list(csv.DictReader(handle))
    predictions = predictor.predict([shapes / row["path"] for row in rows], batch_size=64)
    scores = np.array([[p for _, p in prediction.top] for prediction in predictions])
    labels = np.array([[int(row[kind]) for kind in SHAPES] for row in rows])
    assert [name for name, _ in predictions[0].top] == list(SHAPES)  # all findings, in order
    assert not np.allclose(scores.sum(1), 1)  # sigmoids, not a softmax over findings
    last = read_metrics(trained)[-1]
    for c, kind in enumerate(SHAPES):
        assert float(last[f"auroc_{kind}"]) == pytest.approx(
            roc_auc_score(labels[:, c], scores[:, c]), abs=2e-6
        )


def test_eval_of_a_multilabel_model_reports_auroc_per_finding_and_plots_roc(
    trained, shapes, tmp_path, capsys
):
    argv = [
        "eval", "--weights", str(trained / "final.safetensors"), "--dataset", "csv",
        "--data-dir", str(shapes), "--csv", "test.csv", "--precision", "fp32", "--workers", "0",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean AUROC" in printed and all(kind in printed for kind in SHAPES)
    metrics = json.loads((tmp_path / "metrics-csv-test.json").read_text())
    last = read_metrics(trained)[-1]
    assert metrics["mean_auroc"] == pytest.approx(float(last["test_mean_auroc"]), abs=2e-6)
    assert (tmp_path / "roc-csv-test.png").stat().st_size > 0
    assert (tmp_path / "per_class-csv-test.csv").read_text().startswith("class,auroc,")


def test_a_single_label_csv_trains_with_todays_columns_and_skips_unreadable_images(
    shapes, tmp_path, capsys
):
    (shapes / "broken.png").write_text("not an image")
    lines = ["file,label"] + [f"images/train{i}.png,{'ab'[i % 2]}" for i in range(16)]
    write_csv(shapes, "single_train.csv", "\n".join(lines) + "\n")
    # In the test split: evaluation reads every image, so the count is exact.
    write_csv(shapes, "single_test.csv", "\n".join([*lines[:9], "broken.png,a"]) + "\n")
    run = tmp_path / "run"
    argv = csv_args(shapes, "--epochs", "1", "--batch-size", "8", "--out", str(run))
    argv[argv.index("train.csv")] = "single_train.csv"
    argv[argv.index("test.csv")] = "single_test.csv"
    assert main(argv) == 0
    rows = read_metrics(run)
    assert list(rows[0]) == list(EpochRow.columns())
    assert rows[0]["skipped_images"] == "1"
    assert load_for_inference(run / "final.safetensors").class_names == ["a", "b"]


def test_a_test_csv_with_a_class_training_never_saw_names_its_row(shapes, tmp_path, capsys):
    write_csv(shapes, "single_train.csv", "path,label\nimages/train0.png,a\n")
    write_csv(shapes, "single_test.csv", "path,label\nimages/test0.png,a\nimages/test1.png,z\n")
    argv = csv_args(shapes, "--out", str(tmp_path / "run"))
    argv[argv.index("train.csv")] = "single_train.csv"
    argv[argv.index("test.csv")] = "single_test.csv"
    assert main(argv) == 2
    assert "single_test.csv line 3: class 'z'" in capsys.readouterr().err


def test_rgb_weights_load_for_gray_images_with_summed_first_filters(tmp_path):
    rgb = create_model("densenet121", **TINY).eval()
    preprocessing = PRESETS["densenet121"].preprocessing
    save_weights(rgb, tmp_path / "rgb.safetensors", meta={"preprocessing": preprocessing.to_dict()})
    gray = create_model(
        "densenet121", weights=tmp_path / "rgb.safetensors", in_channels=1, **TINY
    ).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(images), rgb(images.repeat(1, 3, 1, 1)))
    assert preprocessing.gray().mean == (round(sum(preprocessing.mean) / 3, 6),)


def test_a_grayscale_finetune_from_rgb_weights_stores_one_channel_preprocessing(shapes, tmp_path):
    base = create_model("densenet_bc100_k12", block_config=(2, 2, 2), growth_rate=8, num_classes=10)
    save_weights(base, tmp_path / "rgb.safetensors")
    run = tmp_path / "run"
    argv = csv_args(shapes, "--epochs", "1", "--out", str(run), "--grayscale")
    argv += ["--finetune", str(tmp_path / "rgb.safetensors"), "--mean", "0.1", "0.2", "0.3"]
    assert main(argv) == 0
    loaded = load_for_inference(run / "final.safetensors")
    assert loaded.model.config.in_channels == 1 and loaded.multilabel
    assert loaded.preprocessing.mean == (0.2,) and loaded.preprocessing.std == (0.3,)


def test_scores_are_gathered_rows_not_averaged_aurocs(tmp_path):
    """One process in a real (gloo) group: the gather path runs, and rows come back whole."""
    scores = torch.rand(5, 3)
    assert all_gather_rows(scores) is scores  # no process group: nothing to gather
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.testing.assert_close(all_gather_rows(scores), scores)
        assert all_gather_rows(torch.zeros(0, 3)).shape == (0, 3)
    finally:
        dist.destroy_process_group()


def test_positive_weights_are_negatives_over_positives_per_class(shapes):
    data = load_split("csv", shapes, "train", csv_file="train.csv")
    setup = DataSetup(data, data, data.class_names, 3, multilabel=True)
    labels = np.array([label for _, label in data.samples])
    expected = (len(labels) - labels.sum(0)) / labels.sum(0)
    torch.testing.assert_close(positive_weights(setup), torch.tensor(expected).float())


def test_one_0_1_column_is_single_label_unless_the_task_says_multilabel(shapes):
    write_csv(shapes, "one.csv", "path,square\nimages/train0.png,1\nimages/train1.png,0\n")
    single = load_split("csv", shapes, "train", csv_file="one.csv")
    assert not single.multilabel and single.class_names == ["0", "1"]
    multi = load_split("csv", shapes, "train", csv_file="one.csv", task="multilabel")
    assert multi.multilabel and multi.class_names == ["square"]
    assert [label for _, label in multi.samples] == [(1.0,), (0.0,)]


def test_a_finished_multilabel_run_resumes_from_its_saved_history(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "metrics.csv").read_text()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "finished its 12 epochs" in capsys.readouterr().out
    assert (run / "metrics.csv").read_text() == before


def test_multilabel_label_smoothing_moves_each_target_towards_one_half():
    logits, targets = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    weights = torch.tensor([1.0, 2.0, 5.0])
    loss = SmoothedBCEWithLogitsLoss(0.2, pos_weight=weights)(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets * 0.8 + 0.1, pos_weight=weights
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert SmoothedBCEWithLogitsLoss(0.0)(logits, targets) == (
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    )


def test_mixed_multilabel_targets_are_the_images_proportions_of_their_findings():
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mixed = mixed_targets(labels, 0.75, 3)
    torch.testing.assert_close(mixed, 0.75 * labels + 0.25 * labels.flip(0))


def test_multilabel_runs_train_with_smoothing_mixing_and_a_weight_average(shapes, tmp_path):
    run = tmp_path / "run"
    extra = ("--label-smoothing", "0.1", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0")
    extra += ("--ema-decay", "0.9")
    assert main([*csv_args(shapes, "--epochs", "3", "--out", str(run), *extra)]) == 0
    rows = read_metrics(run)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["test_mean_auroc"]) > 0.5
    # The weight average is scored by mean AUROC, saved, and can be the best weights.
    ema_scores = [float(row["ema_test_mean_auroc"]) for row in rows]
    assert all(0 <= score <= 1 for score in ema_scores)
    with safe_open(run / "ema.safetensors", "pt") as handle:
        meta = json.loads(handle.metadata()["meta"])
    assert meta["weights"] == "ema" and meta["test_mean_auroc"] == ema_scores[-1]
    with safe_open(run / "best.safetensors", "pt") as handle:
        best = json.loads(handle.metadata()["meta"])
    raw_scores = [float(row["test_mean_auroc"]) for row in rows]
    best_score = max(max(raw_scores), max(ema_scores))
    assert best["test_mean_auroc"] == best_score
    assert best["weights"] == ("ema" if best_score in ema_scores else "raw")
