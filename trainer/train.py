"""`run(spec, workdir)`: the two-phase training state machine, resumable at any step."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from trainer import backend

tf = backend.import_tensorflow()  # Before Keras, which imports it loudly.

import keras  # noqa: E402
import numpy as np  # noqa: E402

from trainer import (  # noqa: E402
    checkpoint,
    config,
    input_pipeline,
    models,
    preemption,
    runtime,
    storage,
)
from trainer.errors import (  # noqa: E402
    SpecChangedError,
    SpecError,
    StorageError,
    TrainingError,
)

log = logging.getLogger(__name__)

_first_step_done: list[float] = []  # Time of this process's first training step.


@dataclasses.dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore exactly."""

    phase_index: int = 0
    epoch: int = 0  # within the phase
    step: int = 0  # training steps done within the epoch
    global_step: int = 0
    # Partial sums of the current epoch's training metrics (a resumed epoch
    # reports the same numbers as an uninterrupted one).
    train_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    optimizer_phase: int | None = None  # phase the saved optimizer slots belong to
    confusion: list[list[float]] = dataclasses.field(
        default_factory=list
    )  # last validation
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    shape_hash: str = ""
    # Records skipped as corrupt so far; saved as its entries().
    corrupt: input_pipeline.CorruptTally = dataclasses.field(
        default_factory=input_pipeline.CorruptTally
    )


def run(
    spec: config.JobSpec,
    workdir: str,
    *,
    deadline_seconds: float | None = None,
    metadata_url: str | None = None,
) -> dict[str, Any]:
    """Trains `spec` into `workdir`, resuming from its newest checkpoint.

    Args:
      spec: the validated job spec.
      workdir: any fsspec URL or local path; the run's identity.
      deadline_seconds: stop (checkpoint, exit 75) before this many seconds.
      metadata_url: GCE metadata `preempted` endpoint to poll (None: spec's).

    Returns:
      The final summary dict (also written to `{workdir}/summary.json`).

    Raises:
      preemption.Preempted: stopped by a signal or deadline after a durable
        checkpoint; running again resumes.
    """
    done = _completed_summary(workdir)
    if done is not None:
        print(
            f"{workdir} already completed at step {done['global_step']}: "
            f"{json.dumps(done['metrics'])}"
        )
        return done
    rt = runtime.setup(
        spec.runtime, deterministic=spec.train.deterministic, seed=spec.train.seed
    )
    ckpt = checkpoint.CheckpointManager(
        workdir,
        keep=spec.train.keep_checkpoints,
        monitor=spec.train.monitor,
        mode="max" if spec.train.monitor == "val_accuracy" else "min",
        is_chief=rt.is_chief,
    )
    try:
        _record_spec(spec, workdir, rt.is_chief)
        ckpt.claim()
        if spec.train.deterministic:
            # Again, right before the model draws its initial weights and seeds:
            # the storage clients' retry jitter (gcsfs' backoff) draws from
            # Python's global `random` too, so a retried request above would
            # otherwise change the model a run starts from.
            keras.utils.set_random_seed(spec.train.seed)
        with rt.strategy.scope():
            model = models.build_model(spec)
        for phase in spec.phases:  # A typo in phase 2 fails now, not in an hour.
            _set_trainable(model, spec, phase)
        state, arrays = _restore(ckpt, spec, model)
        if arrays is not None and state.phase_index >= len(spec.phases):
            # Trained, but not yet exported: the model weights are all we need.
            model_arrays = {k: v for k, v in arrays.items() if k.startswith("model/")}
            models.assign_variables(model, None, model_arrays)
        watcher = preemption.PreemptionWatcher(
            deadline_seconds=deadline_seconds,
            budget_seconds=spec.train.preemption_budget_seconds,
            metadata_url=preemption.metadata_url(
                spec.train.preemption_metadata_url
                if metadata_url is None
                else metadata_url,
                rt.platform,
            ),
        )
        watcher.start()
        logs = _Logs(workdir, rt.is_chief)
        try:
            summary = _train_and_export(
                spec, workdir, rt, model, state, arrays, ckpt, watcher, logs
            )
        finally:
            watcher.stop()
            logs.close()
        ckpt.close()
        return summary
    except BaseException as e:
        ckpt.close(raise_errors=False)  # The error in flight says more.
        if isinstance(e, (StorageError, TrainingError)):
            raise type(e)(f"{e}. {_durable_note(ckpt)}") from e
        raise


def _durable_note(ckpt) -> str:
    """Where a run that failed stands: the step that running again resumes from."""
    step = ckpt.committed_step
    if step is None:
        return "No checkpoint was committed yet: running again starts over"
    return (
        f"The last durable checkpoint is step {step} ({ckpt.checkpoint_url(step)}): "
        "once fixed, run the same command again to resume from it"
    )


def _train_and_export(spec, workdir, rt, model, state, arrays, ckpt, watcher, logs):
    """The phases from `state` on, then the export; the summary of the run."""
    try:
        for index in range(state.phase_index, len(spec.phases)):
            state.phase_index = index
            _train_phase(spec, rt, model, state, arrays, ckpt, watcher, logs)
            arrays = None  # Restored slots belong to one phase only.
        ckpt.wait()
        metrics = state.history[-1] if state.history else {}
        summary = _summary(spec, state, "completed", ckpt, metrics)
        if rt.is_chief:
            _export(model, workdir)
            _plot(state.history, workdir)
            _plot_confusion(state.confusion, spec, workdir)
            storage.write_json(storage.join(workdir, "summary.json"), summary)
        _print_final(summary, spec, workdir)
        return summary
    except tf.errors.OpError as e:
        _explain_determinism(e, spec, state)
        # Reader errors cross tf.data as OpErrors; give back the DataError
        # (shard URL, offset, remedy) that caused one.
        input_pipeline.reraise_data_error(e)
    except preemption.Preempted:
        if rt.is_chief:
            history = state.history[-1] if state.history else {}
            storage.write_json(
                storage.join(workdir, "summary.json"),
                _summary(spec, state, "preempted", ckpt, history),
            )
        raise


def _train_phase(spec, rt, model, state, arrays, ckpt, watcher, logs) -> None:
    """Trains one phase from `state` on: epochs of steps, validation, checkpoints."""
    phase = spec.phases[state.phase_index]
    _set_trainable(model, spec, phase)
    jit = _jit_for(spec, phase, rt, state)
    with rt.strategy.scope():
        optimizer = _make_optimizer(
            spec.train.optimizer, phase.learning_rate, rt.precision
        )
        optimizer.build(model.trainable_variables)
    if arrays is not None:
        same_phase = state.optimizer_phase == state.phase_index
        if not same_phase:  # Slots of another phase's optimizer: start fresh.
            arrays = {k: v for k, v in arrays.items() if not k.startswith("optimizer/")}
        models.assign_variables(model, optimizer if same_phase else None, arrays)
    state.optimizer_phase = state.phase_index
    steps = _phase_steps(spec, phase)
    counts = models.count_params(model)
    print(
        f"phase {phase.name!r} ({state.phase_index + 1}/{len(spec.phases)}): "
        f"trainable_from={phase.trainable_from!r}, trainable params "
        f"{counts['trainable']:,}, lr {phase.learning_rate:g}, jit_compile={jit}, "
        f"{steps} steps/epoch x {phase.epochs} epochs, {rt.strategy_name} x{rt.num_replicas}"
    )
    step_fn = _make_train_step(model, optimizer, spec, rt, jit)
    eval_fn = _make_eval_step(model, spec, rt)
    every = spec.train.checkpoint_every_steps
    while state.epoch < phase.epochs:
        epoch_key = _epoch_key(spec, state)
        dataset = rt.strategy.distribute_datasets_from_function(
            lambda ctx, k=epoch_key, s=state.step: input_pipeline.train_dataset(
                spec, epoch=k, start_step=s, input_context=ctx, tally=state.corrupt
            ).take((steps - s) * _local_replicas(ctx))
        )
        iterator = iter(dataset)
        print(f"{phase.name} epoch {state.epoch + 1}/{phase.epochs}")
        bar = keras.utils.Progbar(steps, verbose=_progbar_verbosity())
        bar.update(state.step)
        while state.step < steps:
            n = min(
                spec.train.steps_per_execution,
                steps - state.step,
                every - state.global_step % every,
            )
            try:
                sums = _numpy(step_fn(iterator, tf.constant(n)))
            except tf.errors.OutOfRangeError:
                if spec.data.on_corrupt != "skip":
                    raise
                # With data.on_corrupt = "skip", undecodable images are dropped
                # inside tf.data, so the epoch can be short of batches.
                log.warning(
                    "epoch ended %d steps early: records were skipped",
                    steps - state.step,
                )
                print(
                    f"\nwarning: epoch ended after {state.step} of {steps} steps "
                    "(corrupt records skipped; see summary.json corrupt_records)"
                )
                break
            if not _first_step_done:  # benchmarks/resume.py reads this line.
                _first_step_done.append(time.time())
                print(
                    f"first step done after {time.time() - preemption.process_start_time():.1f}s "
                    f"(global step {state.global_step + n})"
                )
            _accumulate(state.train_sums, sums)
            state.step += n
            state.global_step += n
            bar.update(state.step, _train_metrics(state.train_sums).items())
            if not np.isfinite(sums["loss"]):
                raise TrainingError(
                    f"non-finite training loss at global step {state.global_step} "
                    f"(phase {phase.name!r}); lower phases.{phase.name}.learning_rate"
                )
            reason = watcher.reason()
            if reason:
                print(
                    f"\n{reason}: saving a checkpoint at step {state.global_step} and stopping"
                )
                _save(ckpt, model, optimizer, state, blocking=True)
                raise preemption.Preempted(reason)
            if state.global_step % every == 0:
                _save(ckpt, model, optimizer, state)
        val = _evaluate(eval_fn, spec, rt, state.corrupt, epoch_key)
        record = {
            "phase": phase.name,
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            **_train_metrics(state.train_sums),
            **{k: v for k, v in val.items() if k != "confusion"},
        }
        print(
            " - ".join(
                f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                for k, v in record.items()
            )
        )
        state.history.append(record)
        state.confusion = np.asarray(val["confusion"]).tolist()
        logs.write(record, state.global_step, val.get("confusion"))
        if rt.is_chief:  # Progress a user (or a dashboard) can poll.
            storage.write_json(
                storage.join(logs.workdir, "summary.json"),
                _summary(spec, state, "running", ckpt, record),
            )
        stop_early = _update_best(spec, state, record[spec.train.monitor])
        state.epoch += 1
        state.step = 0
        state.train_sums = {}
        if stop_early:
            print(
                f"early stopping: {spec.train.monitor} did not improve for "
                f"{spec.train.early_stopping_patience} epochs"
            )
            break
        if state.epoch < phase.epochs:
            _save(ckpt, model, optimizer, state, metric=record[spec.train.monitor])
    # Phase boundary: the next start resumes with the next phase's fresh optimizer.
    state.phase_index += 1
    state.epoch = 0
    state.step = 0
    state.epochs_without_improvement = 0
    metric = state.history[-1][spec.train.monitor] if state.history else None
    _save(ckpt, model, None, state, metric=metric)


# ---------------------------------------------------------------------------
# Steps


def _explain_determinism(e: Exception, spec, state) -> None:
    """Op determinism has no XLA kernel for some gradients: say which keys to change."""
    if isinstance(e, tf.errors.UnimplementedError) and "deterministic" in str(e):
        phase = spec.phases[min(state.phase_index, len(spec.phases) - 1)]
        first = str(e).strip().splitlines()
        detail = next(
            (ln for ln in first if "deterministic" in ln), first[0] if first else ""
        )
        raise SpecError(
            f"train.deterministic = true cannot run phase {phase.name!r} with XLA "
            f"({detail.strip()}); set phases.{phase.name}.jit_compile = false, or "
            "train.deterministic = false"
        ) from None


def _set_trainable(model, spec, phase) -> None:
    try:
        models.set_trainable(model, spec.model.backbone, phase.trainable_from)
    except ValueError as e:
        raise SpecError(f"phases.{phase.name}.{e}") from None


def _make_optimizer(name: str, learning_rate: float, precision: str):
    cls = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
    }[name]
    optimizer = cls(learning_rate=learning_rate)
    if precision == "mixed_float16":
        # float16 gradients underflow without loss scaling (Keras mixed precision guide).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _per_example(spec, labels, outputs):
    """Per-example loss and correctness, in float32 whatever the compute dtype."""
    outputs = tf.cast(outputs, tf.float32)
    if spec.data.num_classes == 1:
        y = tf.cast(tf.reshape(labels, (-1, 1)), tf.float32)
        loss = keras.losses.binary_crossentropy(y, outputs)
        pred = tf.cast(tf.reshape(outputs, (-1,)) > 0.5, tf.int32)
    else:
        loss = keras.losses.sparse_categorical_crossentropy(labels, outputs)
        pred = tf.argmax(outputs, axis=-1, output_type=tf.int32)
    correct = tf.cast(tf.equal(pred, tf.cast(labels, tf.int32)), tf.float32)
    return loss, correct, pred


def _make_train_step(model, optimizer, spec, rt, jit: bool):
    """A `tf.function` running `n` steps (steps_per_execution) per call."""
    global_batch = spec.train.global_batch_size
    strategy = rt.strategy

    def replica_step(images, labels):
        # Watch only what this phase trains. Keras' frozen layers keep their
        # tf.Variables "trainable" underneath, so a default tape would record
        # the whole backbone and put its backward pass into the graph (XLA then
        # compiles it, and op determinism rejects its MaxPool gradient).
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in model.trainable_variables])
            outputs = model(tf.cast(images, tf.float32), training=True)
            loss, correct, _ = _per_example(spec, labels, outputs)
            # Sum over the replica's examples / the global batch: summed across
            # replicas this is the mean over the global batch.
            scaled = tf.reduce_sum(loss) / global_batch
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        return {
            "loss": tf.reduce_sum(loss),
            "correct": tf.reduce_sum(correct),
            "count": count,
        }

    replica_fn = tf.function(replica_step, jit_compile=jit) if jit else replica_step

    def reduce(value):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    @tf.function
    def train_steps(iterator, n):
        loss = correct = count = tf.constant(0.0)
        for _ in tf.range(n):
            images, labels = next(iterator)
            out = strategy.run(replica_fn, args=(images, labels))
            loss += reduce(out["loss"])
            correct += reduce(out["correct"])
            count += reduce(out["count"])
        return {"loss": loss, "correct": correct, "count": count}

    return train_steps


def _make_eval_step(model, spec, rt):
    num_classes = max(spec.data.num_classes, 2)
    strategy = rt.strategy

    def replica_step(images, labels, weights):
        outputs = model(tf.cast(images, tf.float32), training=False)
        loss, correct, pred = _per_example(spec, labels, outputs)
        confusion = tf.math.confusion_matrix(
            tf.cast(labels, tf.int32),
            pred,
            num_classes=num_classes,
            weights=weights,
            dtype=tf.float32,
        )
        return {
            "loss": tf.reduce_sum(loss * weights),
            "correct": tf.reduce_sum(correct * weights),
            "count": tf.reduce_sum(weights),
            "confusion": confusion,
        }

    @tf.function
    def eval_step(images, labels, weights):
        out = strategy.run(replica_step, args=(images, labels, weights))
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
            for k, v in out.items()
        }

    return eval_step


def _evaluate(eval_fn, spec, rt, tally=None, pass_key=0) -> dict[str, Any]:
    dataset = rt.strategy.distribute_datasets_from_function(
        lambda ctx: input_pipeline.eval_dataset(
            spec, input_context=ctx, tally=tally, pass_key=pass_key
        )
    )
    total: dict[str, Any] = {}
    for images, labels, weights in dataset:
        _accumulate(total, _numpy(eval_fn(images, labels, weights)))
    count = max(float(total.get("count", 0.0)), 1.0)
    return {
        "val_loss": float(total.get("loss", 0.0)) / count,
        "val_accuracy": float(total.get("correct", 0.0)) / count,
        "confusion": total.get("confusion"),
    }


def _progbar_verbosity() -> int:
    """A live bar on terminals and notebooks; one line per epoch in log files."""
    interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
    return 1 if interactive else 2


def _numpy(tensors: dict[str, tf.Tensor]) -> dict[str, Any]:
    return {
        k: (v.numpy() if v.shape.rank else float(v.numpy())) for k, v in tensors.items()
    }


def _accumulate(total: dict[str, Any], sums: dict[str, Any]) -> None:
    for k, v in sums.items():
        total[k] = total.get(k, 0.0) + v


def _train_metrics(sums: dict[str, float]) -> dict[str, float]:
    count = max(float(sums.get("count", 0.0)), 1.0)
    return {
        "loss": float(sums.get("loss", 0.0)) / count,
        "accuracy": float(sums.get("correct", 0.0)) / count,
    }


# ---------------------------------------------------------------------------
# State, checkpoints, resume


def _phase_steps(spec, phase) -> int:
    steps = input_pipeline.steps_per_epoch(spec)
    if phase.steps_per_epoch:
        steps = min(steps, phase.steps_per_epoch)
    if steps < 1:
        raise ValueError(
            f"data.train: fewer records than train.global_batch_size="
            f"{spec.train.global_batch_size}; lower the batch size or add data"
        )
    return steps


def _local_replicas(ctx) -> int:
    """Replicas fed by one input pipeline: each takes one element per step."""
    return ctx.num_replicas_in_sync // ctx.num_input_pipelines


def _epoch_key(spec, state) -> int:
    """A global epoch number: distinct shuffles for every epoch of every phase."""
    return sum(p.epochs for p in spec.phases[: state.phase_index]) + state.epoch


def _jit_for(spec, phase, rt, state) -> bool:
    """The phase's jit_compile; on resume, the choice recorded in the checkpoint."""
    recorded = state.runtime.get("jit", {}).get(phase.name)
    if recorded is not None:
        return bool(recorded)
    jit = _resolve_jit(spec, phase, rt.device_type)
    state.runtime.setdefault("jit", {})[phase.name] = jit
    return jit


def _resolve_jit(spec, phase, device_type: str) -> bool:
    """`jit_compile` for a phase: the spec's value, or the fixed `auto` rule."""
    value = spec.phase_jit(phase)
    return (
        models.jit_rule(phase.trainable_from, device_type)
        if value == "auto"
        else bool(value)
    )


def _save(ckpt, model, optimizer, state, *, metric=None, blocking=False) -> None:
    """Checkpoints model (and the phase's optimizer) with the loop state.

    The snapshot is a callable so the manager takes it only once the previous
    upload is done: at most two copies of the state are ever in host memory.
    """
    # asdict deep-copies fields; the tally (with its lock) goes as its entries.
    payload = dataclasses.asdict(dataclasses.replace(state, corrupt=None))
    payload["corrupt"] = state.corrupt.entries()
    payload["optimizer_phase"] = None if optimizer is None else state.optimizer_phase
    ckpt.save(
        state.global_step,
        lambda: models.snapshot_variables(model, optimizer),
        payload,
        best_step=state.best_step,
        metric=metric,
        blocking=blocking,
    )


def _restore(ckpt, spec, model) -> tuple[TrainState, dict | None]:
    """The newest valid checkpoint's state and arrays; a fresh state if none."""
    restored = ckpt.restore()
    state = TrainState(shape_hash=spec.shape_hash())
    if restored is None:
        return state, None
    arrays, saved = restored
    fields = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved.items() if k in fields})
    state.corrupt = input_pipeline.CorruptTally(saved.get("corrupt", ()))
    if state.shape_hash and state.shape_hash != spec.shape_hash():
        raise SpecChangedError(
            f"checkpoint step {state.global_step} was written for a different model "
            "shape; see job.json in the workdir"
        )
    print(
        f"resuming from step {state.global_step}: phase "
        f"{spec.phases[min(state.phase_index, len(spec.phases) - 1)].name!r}, "
        f"epoch {state.epoch + 1}, step {state.step} in the epoch"
    )
    return state, arrays


def _record_spec(spec, workdir, is_chief) -> None:
    """Writes job.json on the first run; refuses shape-changing edits later."""
    url = storage.join(workdir, "job.json")
    if storage.exists(url):
        first = config.from_dict(storage.read_json(url))
        old, new = first.shape_fingerprint(), spec.shape_fingerprint()
        changed = [k for k in new if old.get(k) != new.get(k)]
        if changed:
            lines = "; ".join(
                f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in changed
            )
            raise SpecChangedError(
                f"cannot resume {workdir} with a different model shape ({lines}); "
                "use a new --workdir, or restore the original values"
            )
        for key, (a, b) in _diff(first.to_dict(), spec.to_dict()).items():
            log.warning("spec change on resume: %s: %r -> %r", key, a, b)
            print(f"note: spec changed since the first run: {key}: {a!r} -> {b!r}")
        return
    if is_chief:
        storage.write_json(url, spec.to_dict())


def _diff(a, b, prefix="") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif (
        _named_list(a)
        and _named_list(b)
        and [x["name"] for x in a] == [x["name"] for x in b]
    ):
        # Phases: name the changed field, e.g. phases.transfer.learning_rate.
        for x, y in zip(a, b, strict=False):
            out |= _diff(x, y, f"{prefix}{x['name']}.")
    elif a != b:
        out[prefix.rstrip(".")] = (a, b)
    return out


def _named_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, dict) and "name" in x for x in value
    )


def _completed_summary(workdir: str) -> dict | None:
    url = storage.join(workdir, "summary.json")
    if not storage.exists(url):
        return None
    summary = storage.read_json(url)
    return summary if summary.get("status") == "completed" else None


def _update_best(spec, state, value: float) -> bool:
    """Tracks the best monitored value; True when early stopping should fire."""
    better = state.best_metric is None or (
        value > state.best_metric
        if spec.train.monitor == "val_accuracy"
        else value < state.best_metric
    )
    if better:
        state.best_metric, state.best_step = value, state.global_step
        state.epochs_without_improvement = 0
        return False
    state.epochs_without_improvement += 1
    patience = spec.train.early_stopping_patience
    return bool(patience) and state.epochs_without_improvement >= patience


def _print_final(summary: dict[str, Any], spec, workdir: str) -> None:
    metrics = ", ".join(
        f"{k} {v:.4f}" for k, v in summary["metrics"].items() if isinstance(v, float)
    )
    best = summary["best"]
    note = ""
    if best.get(spec.train.monitor) is not None:
        note = f" (best {spec.train.monitor} {best[spec.train.monitor]:.4f} at step {best['global_step']})"
    print(
        f"completed {spec.name} at step {summary['global_step']}: {metrics}{note}\n"
        f"model: {storage.join(workdir, 'export', 'model.keras')}"
    )


def _summary(spec, state, status, ckpt, metrics) -> dict[str, Any]:
    phase = spec.phases[min(state.phase_index, len(spec.phases) - 1)]
    return {
        "status": status,
        "name": spec.name,
        "phase": phase.name,
        "global_step": state.global_step,
        "last_durable_step": ckpt.last_durable_step,
        "metrics": {
            k: v
            for k, v in metrics.items()
            if k not in ("phase", "epoch", "global_step")
        },
        "best": {spec.train.monitor: state.best_metric, "global_step": state.best_step},
        "corrupt_records": state.corrupt.summary(),
        "history": state.history,
    }


# ---------------------------------------------------------------------------
# Outputs: TensorBoard logs, export, plots


class _Logs:
    """TensorBoard event files, written locally and mirrored to `{workdir}/logs`.

    tf.summary writes only to local disk and gs://; staging locally and copying
    through storage.py works for every fsspec workdir.
    """

    def __init__(self, workdir: str, enabled: bool):
        self.workdir = workdir
        self.url = storage.join(workdir, "logs")
        self.enabled = enabled
        self.local = tempfile.mkdtemp(prefix="trainer-logs-")
        self.writer = tf.summary.create_file_writer(self.local) if enabled else None

    def write(self, record: dict[str, Any], step: int, confusion) -> None:
        if not self.enabled:
            return
        with self.writer.as_default(step=step):
            for k, v in record.items():
                if isinstance(v, float):
                    tf.summary.scalar(k, v)
        self.writer.flush()
        storage.put(self.local, self.url)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)


def _export(model, workdir: str) -> None:
    """Writes `{workdir}/export/model.keras` (loads in Keras' safe mode)."""
    with tempfile.TemporaryDirectory(prefix="trainer-export-") as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        storage.put(path, storage.join(workdir, "export", "model.keras"))


def _plot_confusion(confusion: list[list[float]], spec, workdir: str) -> None:
    """The last validation's confusion matrix (rows: true class) as PNG."""
    if not confusion:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion, dtype=np.int64)
    n = matrix.shape[0]
    names = spec.class_names()
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color=color,
                fontsize=8,
            )
    ax.set_xticks(range(n), names, rotation=90 if n > 12 else 0)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"validation, accuracy {accuracy:.3f}")
    _save_png(fig, storage.join(workdir, "plots", "confusion_matrix.png"))


def _plot(history: list[dict[str, Any]], workdir: str) -> None:
    """Training curves (loss and accuracy per epoch, phases marked) as PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=False):
        ax.plot(x, [h[key] for h in history], marker="o", label=f"train {key}")
        ax.plot(x, [h[f"val_{key}"] for h in history], marker="o", label=f"val {key}")
        starts = [
            i + 1
            for i, h in enumerate(history)
            if i == 0 or h["phase"] != history[i - 1]["phase"]
        ]
        for s in starts:
            ax.axvline(s - 0.5, color="grey", linestyle=":")
            ax.text(
                s - 0.4, ax.get_ylim()[1], history[s - 1]["phase"], va="top", fontsize=8
            )
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if key == "loss":
            ax.set_yscale("log")  # The first epoch's loss would flatten the rest.
        ax.legend()
    _save_png(fig, storage.join(workdir, "plots", "training_curves.png"))


def _save_png(fig, url: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


# ---------------------------------------------------------------------------
# `trainer check`: the local CPU dry run


def check(
    spec: config.JobSpec, workdir: str, *, dry_run_steps: int = 2
) -> dict[str, Any]:
    """Validates everything a real run needs, prints the plan, runs a few steps.

    Resolves the data globs, probes the workdir for write access, builds the
    model (loading its weights), then runs `dry_run_steps` training steps per
    phase with a tiny batch. Writes nothing to the workdir.

    Returns:
      The plan as a dict (also printed as a table).
    """
    rt = runtime.setup(
        spec.runtime, deterministic=spec.train.deterministic, seed=spec.train.seed
    )
    train_info = input_pipeline.split_info(spec, "train")
    val_info = input_pipeline.split_info(spec, "validation")
    storage.check_writable(workdir)
    with rt.strategy.scope():
        model = models.build_model(spec)
    weight_bytes = sum(int(np.prod(v.shape)) * 4 for v in model.variables)
    steps = input_pipeline.steps_per_epoch(spec)
    plan: dict[str, Any] = {
        "job": spec.name,
        "workdir": workdir,
        **rt.describe(),
        "global_batch_size": spec.train.global_batch_size,
        "per_replica_batch_size": spec.train.global_batch_size // rt.num_replicas,
        "train": f"{train_info['records']} records in {len(train_info['shards'])} shard(s)",
        "validation": f"{val_info['records']} records in {len(val_info['shards'])} shard(s)",
        "steps_per_epoch": steps,
        "checkpoint_every_steps": spec.train.checkpoint_every_steps,
        "phases": [],
    }
    tiny_batch = 2 * rt.num_replicas
    tiny = dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, global_batch_size=tiny_batch)
    )
    for phase in spec.phases:
        _set_trainable(model, spec, phase)
        counts = models.count_params(model)
        jit = _resolve_jit(spec, phase, rt.device_type)
        with rt.strategy.scope():
            optimizer = _make_optimizer(
                spec.train.optimizer, phase.learning_rate, rt.precision
            )
            optimizer.build(model.trainable_variables)
        slot_bytes = sum(int(np.prod(v.shape)) * 4 for v in optimizer.variables)
        dataset = rt.strategy.distribute_datasets_from_function(
            lambda ctx: input_pipeline.train_dataset(
                tiny, epoch=0, input_context=ctx
            ).take(dry_run_steps * _local_replicas(ctx))
        )
        start = time.perf_counter()
        step_fn = _make_train_step(model, optimizer, tiny, rt, jit)
        try:
            sums = _numpy(step_fn(iter(dataset), tf.constant(dry_run_steps)))
        except tf.errors.OpError as e:
            _explain_determinism(
                e, spec, TrainState(phase_index=spec.phases.index(phase))
            )
            input_pipeline.reraise_data_error(e)
        seconds = time.perf_counter() - start
        if not np.isfinite(sums["loss"]):
            raise TrainingError(
                f"phase {phase.name!r}: non-finite loss in the dry run; lower "
                f"phases.{phase.name}.learning_rate"
            )
        plan["phases"].append(
            {
                "name": phase.name,
                "epochs": phase.epochs,
                "trainable_from": phase.trainable_from,
                "trainable_params": counts["trainable"],
                "jit_compile": jit,
                "checkpoint_bytes": weight_bytes + slot_bytes,
                "dry_run": f"{dry_run_steps} steps of batch {tiny_batch} in {seconds:.1f}s, loss {sums['loss'] / sums['count']:.3f}",
            }
        )
    _print_plan(plan)
    return plan


def _print_plan(plan: dict[str, Any]) -> None:
    width = max(len(k) for k in plan)
    for key, value in plan.items():
        if key != "phases":
            print(f"{key:<{width}}  {value}")
    for p in plan["phases"]:
        print(f"phase {p['name']}:")
        for key, value in p.items():
            if key != "name":
                shown = (
                    f"{value:,}"
                    if isinstance(value, int) and not isinstance(value, bool)
                    else value
                )
                if key == "checkpoint_bytes":
                    shown = f"{value / 2**20:.1f} MiB"
                print(f"  {key:<18}{shown}")
    print("check passed: nothing was written to the workdir")
