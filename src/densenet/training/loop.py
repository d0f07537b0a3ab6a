"""The training loop: the paper's SGD and step schedule (or AdamW, cosine, accumulation, clipping,
random erasing, mixup/cutmix and a weight average), evaluation every epoch, resumable at any
optimizer step.

Every source of randomness is a pure function of (seed, epoch, step): the data order and
augmentation (see loaders.py) and dropout (the global RNG is re-seeded before each step). Together
with the optimizer state in the saved training state, this makes a run resumed at any step compute
exactly what the uninterrupted run computes.

Under torchrun each process trains on its slice of every global batch; gradients are averaged by
DistributedDataParallel and the step's loss and accuracy are summed over processes (distributed.py).
The data (crops, flips and augmentation policies included), and so a run without dropout, random
erasing or mixing, do not depend on the number of processes; those three are drawn per process.

A step never waits for the device: its sums stay there, and the host reads them every
``SYNC_STEPS`` steps, before a save and at the end of the epoch. A non-finite loss is therefore
noticed up to ``SYNC_STEPS`` steps late, then reported at the step where it first appeared; no
state with non-finite weights is ever saved. A non-finite test loss, and an epoch in which no
image could be read, stop the run too, before the epoch's state or weights are saved.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TypeVar

import torch
from torch import Tensor, nn
from tqdm import tqdm

from densenet.data.datasets import Data, FolderData
from densenet.data.erasing import erase_batch
from densenet.data.loaders import Batch, FolderBatches, Normalize, TensorBatches, mix_seed
from densenet.data.mixing import mix_batch, mixed_targets
from densenet.errors import DatasetError, DenseNetError, Preempted, TrainingError
from densenet.hardware import autocast, resolve_device, to_memory_format, why_precision
from densenet.training.config import MAX_WARMUP_SHARE, TrainConfig
from densenet.training.distributed import (
    DistributedContext,
    all_ranks_agree,
    all_reduce_sum,
    average_gradients,
    broadcast_buffers,
    current_context,
    data_parallel,
    gradient_sync,
    rank_device,
    stop_together,
    stopped_with_others,
)
from densenet.training.evaluate import (
    EvalResult,
    MultiLabelResult,
    evaluate,
    evaluate_multilabel,
    topk_correct,
)
from densenet.training.events import RunEvents, check_available
from densenet.training.metrics import DeviceTally, EpochRow, MultiLabelRow, Row, Tally
from densenet.training.preemption import StopRequests
from densenet.training.rundir import RunDirectory
from densenet.training.setup import (
    DataSetup,
    Learner,
    build_batches,
    build_learner,
    load_data,
    resolve_config,
    updates_done,
    updates_per_epoch,
    weights_meta,
)
from densenet.training.state import TrainState

# Steps between reads of the device's running sums (progress bar, non-finite check).
SYNC_STEPS = 16
_Error = TypeVar("_Error", bound=DenseNetError)


def train(
    config: TrainConfig, run: RunDirectory, *, resume: bool = False, progress: bool = True
) -> Row:
    """Train per ``config`` into ``run``; returns the last epoch's metrics."""
    previous_determinism = torch.are_deterministic_algorithms_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(config.deterministic)
    # cuDNN's autotuner picks the fastest convolution algorithm per shape by timing, so which one
    # (and its rounding) can change from run to run: only a non-deterministic run may use it.
    torch.backends.cudnn.benchmark = not config.deterministic
    try:
        with StopRequests() as stops, contextlib.ExitStack() as closing:
            return _train(config, run, resume, progress, stops, closing)
    finally:
        torch.use_deterministic_algorithms(previous_determinism)
        torch.backends.cudnn.benchmark = previous_benchmark


def _train(
    config: TrainConfig,
    run: RunDirectory,
    resume: bool,
    progress: bool,
    stops: StopRequests,
    closing: contextlib.ExitStack,
) -> Row:
    # Under torchrun every process runs this function; the process group is already up (see
    # distributed.distributed_session) and only the main process writes or prints.
    context = current_context()
    context.data_shard.of(config.batch_size, train=True)  # refuse a batch that does not split
    device = rank_device(resolve_device(config.device), context)
    # Every process has read the data and the saved state before the run directory changes, and
    # one that can't makes all of them stop.
    auto_precision = config.precision == "auto"
    with stop_together(device):
        check_available(config)
        data = load_data(config)
        config = resolve_config(config, data)
        saved = run.read_state() if resume else None
        train_batches, test_batches = build_batches(config, data, device, context.data_shard)
        steps = len(train_batches)
        learner = build_learner(config, data, device, saved, str(run / run.STATE), steps)
    # Written once everything above has been checked: a run that could not start leaves no run.
    if not resume:
        run.write_config(config)
    state = saved.state if saved else TrainState()
    events = closing.enter_context(
        RunEvents.open(config, run, state, steps, data.multilabel, resume)
    )
    normalize = Normalize(config.mean, config.std).to(device)
    meta = weights_meta(config, data)
    say = print if context.is_main else lambda line: None
    why = why_precision(device, config.precision) if auto_precision else None
    say(_opening_line(config, meta, data, steps, device, context.world_size, state, resume, why))

    def save() -> None:
        # A diverging step can leave inf weights behind a finite loss: never save those.
        if not all(bool(torch.isfinite(p).all()) for p in learner.model.parameters()):
            where = _at_step(state.epoch * steps + state.step, steps)
            raise _diverged(run, config, f"weights became non-finite {where}")
        events.flush()  # events before the state: a resumed run drops what follows the state
        learner_states = learner.state_dicts()
        run.write_state(state, learner_states, config.to_dict(), learner.model.config.to_dict())

    # The optimizer updates `model`'s parameters; `trained` averages their gradients over ranks.
    trained = data_parallel(learner.model, context, device)
    if config.compile:
        # The DDP wrapper is compiled, not the network inside it, as PyTorch's DDP and
        # torch.compile docs recommend: dynamo then splits the graph at DDP's gradient buckets so
        # their all-reduce overlaps the backward pass. The saved state dicts stay learner.model's.
        trained = torch.compile(trained)
    first_steps: list[float] = []  # with --compile: the first two steps' seconds
    empty_possible = isinstance(train_batches, FolderBatches)
    while state.epoch < config.epochs:
        learner.model.train()
        sums = DeviceTally(state.tally, device)
        events.start_window(state)
        bar = _progress_bar(config, state, steps, enabled=progress and context.is_main)
        tick = time.perf_counter()
        for batch in train_batches.epoch(state.epoch, state.step):
            fetched = time.perf_counter()
            state.data_seconds += fetched - tick
            seed = mix_seed(config.seed, state.epoch, state.step, 2, context.rank)
            # Batches of one accumulation each add their share of its mean gradient.
            first = state.step - state.step % config.accumulate
            group = min(config.accumulate, steps - first)
            update = state.step + 1 == first + group
            step_sums = train_step(
                trained, learner, batch, config, normalize, seed, empty_possible, 1 / group, update
            )
            sums.add(step_sums, state.step)
            state.step += 1
            # A state is saved, and a stop taken, only after an optimizer step: the gradients of
            # an unfinished accumulation are not part of the state.
            save_now = update and _periodic_save_due(config, state, steps)
            sync = save_now or state.step % SYNC_STEPS == 0 or state.step == steps
            stop = update and stops.agreed(sync or not context.enabled, device)
            if sync or stop:
                state.tally, bad_step = sums.read()
                if bad_step is not None:
                    raise _loss_diverged(run, config, state, bad_step, steps, context)
                bar.set_postfix(_postfix(state, data.multilabel), refresh=False)
            if update:
                events.step(state, synced=sync or stop)
            if save_now or stop:
                save()
            if stop:
                raise _preempted(run, stops, state, steps)
            tick = time.perf_counter()  # everything but waiting for data counts as compute
            state.compute_seconds += tick - fetched
            if config.compile and len(first_steps) < 2:
                first_steps.append(tick - fetched)
                if len(first_steps) == 2 and context.is_main:
                    extra = first_steps[0] - first_steps[1]
                    tqdm.write(f"torch.compile took {extra:.1f} s (the first step's extra time)")
            bar.update(1)
        bar.close()
        # Sums over every process: all of them stop here alike.
        if not state.tally.images:
            skipped = state.tally.skipped
            raise _once(context, _nothing_read(run, data.train, config, state.epoch, skipped))

        def test(model: nn.Module, what: str) -> EvalResult | MultiLabelResult:
            return _test(model, what, test_batches, normalize, config, data, run, state, context)

        raw = test(learner.model, "")
        ema = test(learner.ema.model, " of the weight average") if learner.ema else None
        lr = config.lr * _last_lr_factor(config, state, steps)
        row = _epoch_row(state, raw, ema, lr, data.class_names)
        if row.score > state.best_score:
            better_ema = row.ema_score is not None and row.ema_score > row.raw_score
            best = learner.ema.model if learner.ema and better_ema else learner.model
            run.write_weights(best, run.BEST, {**meta, **_weights_tag(row, better_ema)})
        state.next_epoch(row)
        events.epoch(state)
        # The state before the metrics: a crash in between re-writes the metrics on resume.
        save()
        run.write_metrics(state.history)
        say(row.line(config.epochs))

    last = state.history[-1]
    run.write_weights(learner.model, run.FINAL, {**meta, **_weights_tag(last, False)})
    if learner.ema:
        run.write_weights(learner.ema.model, run.EMA, {**meta, **_weights_tag(last, True)})
    run.write_metrics(state.history)
    if isinstance(last, MultiLabelRow):
        result = f"test mean AUROC {last.score:.4f} (best {state.best_score:.4f})"
    else:
        result = f"test top-1 {last.score:.2f}% (best {state.best_score:.2f}%)"
    say(f"done: {result}, weights in {run / run.FINAL}")
    return last


def _test(
    model: nn.Module,
    what: str,
    batches: TensorBatches | FolderBatches,
    normalize: Normalize,
    config: TrainConfig,
    data: DataSetup,
    run: RunDirectory,
    state: TrainState,
    context: DistributedContext,
) -> EvalResult | MultiLabelResult:
    """The epoch's evaluation of ``model`` (the weights, or ``what`` else: their average)."""
    broadcast_buffers(model)  # evaluate the weights process 0 saves, on every process
    result = (evaluate_multilabel if data.multilabel else evaluate)(
        model,
        batches,
        normalize,
        precision=config.precision,
        memory_format=config.memory_format,
        num_classes=len(data.class_names),
    )
    if not result.count:
        skipped = result.skipped
        raise _once(context, _nothing_read(run, data.test, config, state.epoch, skipped))
    # Finite weights can still overflow in evaluation (huge BatchNorm statistics): such a model
    # predicts nothing, and must not become best.safetensors or the next checkpoint.
    if not math.isfinite(result.loss):
        loss = f"the test loss{what} is {result.loss} after epoch {state.epoch + 1}"
        raise _once(context, _diverged(run, config, loss))
    return result


def train_step(
    trained: nn.Module,
    learner: Learner,
    batch: Batch,
    config: TrainConfig,
    normalize: Normalize,
    seed: int,
    empty_possible: bool,
    share: float = 1.0,
    update: bool = True,
) -> Tensor:
    """The gradient of one batch, times ``share`` of its accumulation, added to the parameters'
    gradients; then, if ``update``, one optimizer step. Returns the batch's :class:`Tally` sums
    over every process, on the device."""
    device = batch.labels.device
    n = len(batch.labels)
    # Every process takes the step or none does: the gradient average needs them all. Only
    # ImageFolder batches can lose all their images (unreadable files), so only they need asking.
    if empty_possible and not all_ranks_agree(n > 0, device):
        if update:
            # The accumulation's earlier batches kept their gradients per process (gradient_sync
            # below), and this batch's backward, which would average them, does not run.
            average_gradients(learner.model)
            optimizer_step(learner, config)
        return all_reduce_sum(Tally(skipped=batch.skipped).totals(device))
    # Dropout draws from the global RNG: a seed per step (and process) makes a resume repeat it.
    torch.manual_seed(seed)
    images = normalize(batch.images)
    # Erased before mixing, as torchvision's and timm's recipes do (per image, then per batch).
    if config.random_erasing:
        images = erase_batch(images, config.random_erasing, mix_seed(seed, 4))
    mixed = None
    if config.mixup_alpha or config.cutmix_alpha:
        mixed = mix_batch(images, config.mixup_alpha, config.cutmix_alpha, mix_seed(seed, 3))
        images = mixed.images
    targets = batch.labels
    # DDP averages the gradients over processes in every backward pass; an accumulation needs
    # that once, in its last batch's. The forward is inside too: DDP prepares its hooks there.
    with gradient_sync(trained, update):
        with autocast(device, config.precision):
            logits = trained(to_memory_format(images, config.memory_format)).float()
        if mixed is not None:
            targets = mixed_targets(batch.labels, mixed.lam, logits.shape[1])
        loss = learner.criterion(logits, targets)
        learner.scaler.scale(loss * share).backward()
    if update:
        optimizer_step(learner, config)
    # Built from device values only: a host-made tensor would be a copy that waits for the device.
    if batch.labels.ndim == 1:
        top1 = (logits.argmax(1) == batch.labels).sum().double()
        top5 = topk_correct(logits, batch.labels, 5).sum().double()
    else:  # multi-label: there is no top-1; its ranking metrics need the whole test set
        top1 = top5 = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.stack(
        [
            loss.detach().double() * n,
            top1,
            top5,
            torch.full((), n, dtype=torch.float64, device=device),
            torch.full((), batch.skipped, dtype=torch.float64, device=device),
        ]
    )
    # Summed over processes: a non-finite loss anywhere is non-finite everywhere, so every
    # process stops at the same step instead of waiting for the others.
    return all_reduce_sum(counts)


def optimizer_step(learner: Learner, config: TrainConfig) -> None:
    """Update the weights from the accumulated gradients, then the schedule and weight average."""
    if config.clip_grad_norm:
        learner.scaler.unscale_(learner.optimizer)  # clip the true gradients, not scaled ones
        clip_gradients(learner.model, config.clip_grad_norm)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.schedule.step()
    if learner.ema:
        learner.ema.update(learner.model)


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Scale all gradients by one factor so that their total L2 norm is at most ``max_norm``;
    returns the norm before. Clipping is all-or-nothing per step, so the update keeps its
    direction."""
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _last_lr_factor(config: TrainConfig, state: TrainState, steps: int) -> float:
    """The lr factor of the epoch's last optimizer step, for its metrics row."""
    return config.lr_factor(
        updates_done(config, state.epoch + 1, 0, steps) - 1, updates_per_epoch(config, steps)
    )


def _epoch_row(
    state: TrainState,
    result: EvalResult | MultiLabelResult,
    ema: EvalResult | MultiLabelResult | None,
    lr: float,
    class_names: list[str],
) -> Row:
    seen, seconds = max(state.tally.images, 1), state.data_seconds + state.compute_seconds
    if isinstance(result, MultiLabelResult):
        return MultiLabelRow(
            epoch=state.epoch + 1,
            train_loss=round(state.tally.loss_sum / seen, 6),
            test_loss=round(result.loss, 6),
            test_mean_auroc=round(result.mean_auroc, 6),
            test_mean_ap=round(result.mean_ap, 6),
            test_mean_f1=round(result.mean_f1, 6),
            lr=float(f"{lr:.12g}"),
            img_per_s=round(state.tally.images / max(seconds, 1e-9), 1),
            seconds=round(seconds, 3),
            data_share=round(state.data_seconds / max(seconds, 1e-9), 4),
            skipped_images=int(state.tally.skipped + result.skipped),
            test_auroc={
                name: round(float(auroc), 6)
                for name, auroc in zip(class_names, result.per_class_auroc, strict=True)
            },
            ema_test_mean_auroc=(
                round(ema.mean_auroc, 6) if isinstance(ema, MultiLabelResult) else None
            ),
        )
    return EpochRow(
        epoch=state.epoch + 1,
        train_loss=round(state.tally.loss_sum / seen, 6),
        train_top1=round(100 * state.tally.top1 / seen, 4),
        train_top5=round(100 * state.tally.top5 / seen, 4),
        test_loss=round(result.loss, 6),
        test_top1=round(result.top1, 4),
        test_top5=round(result.top5, 4),
        ema_test_top1=round(ema.top1, 4) if isinstance(ema, EvalResult) else None,
        lr=float(f"{lr:.12g}"),  # 0.1 * 0.1 is 0.010000000000000002 in binary
        img_per_s=round(state.tally.images / max(seconds, 1e-9), 1),
        seconds=round(seconds, 3),
        data_share=round(state.data_seconds / max(seconds, 1e-9), 4),
        skipped_images=int(state.tally.skipped + result.skipped),
    )


def _progress_bar(config: TrainConfig, state: TrainState, steps: int, enabled: bool) -> tqdm:
    return tqdm(
        total=steps,
        initial=state.step,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        unit="step",
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )


def _periodic_save_due(config: TrainConfig, state: TrainState, steps: int) -> bool:
    """``--checkpoint-every N``: a save every N global steps, except at the end of an epoch."""
    every = config.checkpoint_every
    return bool(every) and state.step < steps and (state.epoch * steps + state.step) % every == 0


def _weights_tag(row: Row, ema: bool) -> dict[str, object]:
    """Which weights a file holds (the network's, or their average) and how they scored."""
    metric = "test_mean_auroc" if isinstance(row, MultiLabelRow) else "test_top1"
    score = row.ema_score if ema else row.raw_score
    return {"epoch": row.epoch, "weights": "ema" if ema else "raw", metric: score}


def _postfix(state: TrainState, multilabel: bool) -> dict[str, str]:
    seen, seconds = max(state.tally.images, 1), state.data_seconds + state.compute_seconds
    accuracy = {} if multilabel else {"acc": f"{100 * state.tally.top1 / seen:.1f}%"}
    return {
        "loss": f"{state.tally.loss_sum / seen:.3f}",
        **accuracy,
        "img_s": f"{state.tally.images / max(seconds, 1e-9):.0f}",
    }


def _opening_line(
    config: TrainConfig,
    meta: dict[str, object],
    data: DataSetup,
    steps: int,
    device: torch.device,
    world_size: int,
    state: TrainState,
    resume: bool,
    why_precision: str | None,
) -> str:
    processes = f" x {world_size} processes" if world_size > 1 else ""
    precision = f"{config.precision} (auto: {why_precision})" if why_precision else config.precision
    line = (
        f"training {meta['model'] or config.model + ' (modified)'} on {config.dataset}: "
        f"{len(data.train)} train / {len(data.test)} test images, {steps} steps of "
        f"{config.batch_size} per epoch{_accumulation(config)}, {precision} "
        f"{config.memory_format} on {device}{processes}"
    )
    line += _shortened_warmup(config)
    if state.epoch >= config.epochs:
        return f"{line}\nthe run has finished its {config.epochs} epochs; writing its final files"
    if state.epoch or state.step:
        return f"{line}\nresuming at epoch {state.epoch + 1}, step {state.step}/{steps}"
    if resume:  # the run stopped before its first save
        return f"{line}\nno state was saved yet: starting at epoch 1"
    return line


def _shortened_warmup(config: TrainConfig) -> str:
    """A line saying the warm-up was capped for this run's length, or nothing."""
    used = config.warmup_epochs_used
    if used == config.warmup_epochs:
        return ""
    return (
        f"\nwarm-up shortened to {used:g} epochs for a {config.epochs}-epoch run "
        f"(warmup_epochs = {config.warmup_epochs:g}; a warm-up takes at most "
        f"{MAX_WARMUP_SHARE:.0%} of the run)"
    )


def _accumulation(config: TrainConfig) -> str:
    if config.accumulate == 1:
        return ""
    effective = config.accumulate * config.batch_size
    return f" (an optimizer step every {config.accumulate}: effective batch {effective})"


def _preempted(run: RunDirectory, stops: StopRequests, state: TrainState, steps: int) -> Preempted:
    where = f"epoch {state.epoch + 1} step {state.step}/{steps}"
    return Preempted(
        f"{stops.received or 'a stop request'} at {where}: the run is saved; continue with: "
        f"densenet train --resume {run.path}"
    )


def _loss_diverged(
    run: RunDirectory,
    config: TrainConfig,
    state: TrainState,
    bad_step: int,
    steps: int,
    context: DistributedContext,
) -> TrainingError:
    where = " on at least one process" if context.enabled else ""
    loss = state.tally.loss_sum / max(state.tally.images, 1)
    step = _at_step(state.epoch * steps + bad_step + 1, steps)
    return _once(context, _diverged(run, config, f"loss is {loss}{where} {step}"))


def _once(context: DistributedContext, error: _Error) -> _Error:
    """``error`` on the main process; the others, which stop with it, point to that one."""
    return error if context.is_main else type(error)(stopped_with_others(context.rank))


def _at_step(global_step: int, steps: int) -> str:
    """Where (1-based) ``global_step`` is, in a run of ``steps`` steps an epoch."""
    epoch, step = (global_step - 1) // steps + 1, (global_step - 1) % steps + 1
    return f"at epoch {epoch} step {step} (global step {global_step})"


def _diverged(run: RunDirectory, config: TrainConfig, what: str) -> TrainingError:
    """The error for a run that produced non-finite numbers (``what``, and where)."""
    path = run / run.STATE
    kept = f"the last good checkpoint {path} is kept" if path.exists() else "nothing was saved"
    # A resumed run keeps its settings, so the fix is a new run with other ones.
    fix = "a lower --lr" if config.precision == "fp32" else "--precision fp32 or a lower --lr"
    return TrainingError(
        f"{what}; training stopped and {kept}: start a new run (another --out) with {fix}"
    )


def _nothing_read(
    run: RunDirectory, data: Data, config: TrainConfig, epoch: int, skipped: float
) -> DatasetError:
    """The error for an epoch (0-based) in which every image of ``data`` was unreadable."""
    where = data.root if isinstance(data, FolderData) else config.data_dir
    return DatasetError(
        f"no image of {where} could be read in epoch {epoch + 1} ({int(skipped)} unreadable files "
        f"skipped); training stopped: replace or remove those files, then continue with: "
        f"densenet train --resume {run.path}"
    )
