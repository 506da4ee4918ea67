"""`trainer check`: the local dry run that validates everything a real run needs."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from trainer import backend

backend.prepare_keras()  # Before Keras: picks its backend, mutes TensorFlow.

import numpy as np  # noqa: E402

from trainer import (  # noqa: E402
    config,
    input_pipeline,
    models,
    step_math,
    storage,
    train,
)
from trainer.errors import TrainingError  # noqa: E402


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
    backend_name = backend.select(spec.runtime.backend)
    spec = input_pipeline.with_class_names(spec)  # What train records and compares.
    _check_workdir_state(spec, workdir)
    with train.setup_runtime(spec, backend_name) as rt:
        train.check_batch(spec, rt)
        train.check_backend(spec, rt)
        plan = _plan(spec, workdir, rt)
        storage.check_writable(workdir)
        engine = train.make_engine(rt)
        with engine.scope():
            model = models.build_model(spec)
        weight_bytes = _nbytes(model.variables)
        train.check_feature_cache(spec, rt, model)
        for phase in spec.phases:
            row = _dry_run(spec, engine, model, phase, dry_run_steps)
            row["checkpoint_bytes"] += weight_bytes
            # The dry run itself reads images: it writes no cache.
            row["feature_cache"] = _feature_cache(spec, phase, rt, model)
            plan["phases"].append(row)
    _print_plan(plan)
    return plan


def _check_workdir_state(spec, workdir: str) -> None:
    """What `train` would say of the workdir: a completed run (it would only
    print its summary), a spec it would refuse to resume, the changes it
    would note. Reads only."""
    from trainer import reports

    done = reports.completed_summary(workdir)
    if done is None:
        train.check_recorded_spec(spec, workdir)
        return
    print(
        f"note: {workdir} already completed at step {done['global_step']}: "
        "`trainer train` would only print its summary; use a new --workdir "
        "to train this spec"
    )


def _plan(spec, workdir: str, rt) -> dict[str, Any]:
    """The run's shape: where, on what, how much data, how often it saves."""
    train_info = input_pipeline.split_info(spec, "train")
    val_info = input_pipeline.split_info(spec, "validation")
    input_pipeline.check_class_count(spec)
    return {
        "job": spec.name,
        "workdir": workdir,
        **rt.describe(),
        "global_batch_size": spec.train.global_batch_size,
        "per_replica_batch_size": spec.train.global_batch_size // rt.num_replicas,
        "train": f"{train_info['records']} records in {len(train_info['shards'])} shard(s)",
        "validation": f"{val_info['records']} records in {len(val_info['shards'])} shard(s)",
        "steps_per_epoch": input_pipeline.steps_per_epoch(spec),
        "checkpoint_every_steps": spec.train.checkpoint_every_steps,
        "phases": [],
    }


def _feature_cache(spec, phase, rt, model) -> str:
    """Whether the phase would train on cached features, and why."""
    if rt.backend == "jax":
        return "no (the JAX backend trains on images)"
    from trainer import feature_cache

    return feature_cache.decide(spec, phase, rt, model).describe()


def _dry_run(spec, engine, model, phase, n: int) -> dict[str, Any]:
    """`n` steps of `phase` with a tiny batch; the phase's row of the plan."""
    rt = engine.rt
    train.set_trainable(model, spec, phase)
    trainable = models.count_params(model)["trainable"]
    if phase.epochs == 0:
        return {
            "name": phase.name,
            "epochs": 0,
            "trainable_from": phase.trainable_from,
            "trainable_params": trainable,
            "checkpoint_bytes": 0,
            "dry_run": "skipped (epochs = 0)",
        }
    # JAX compiles every step (train._Run._jit).
    jit = True if rt.backend == "jax" else train.resolve_jit(spec, phase, rt)
    with engine.scope():
        optimizer = step_math.make_optimizer(
            spec.train.optimizer, phase.learning_rate, rt.precision
        )
        optimizer.build(model.trainable_variables)
    batch = 2 * rt.num_replicas
    tiny = dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, global_batch_size=batch)
    )
    batches = engine.train_batches(
        tiny, epoch=0, start_step=0, batches=n, tally=None, features=None
    )
    start = time.perf_counter()
    step_fn = engine.make_train_step(
        model,
        optimizer,
        num_classes=spec.data.num_classes,
        global_batch=batch,
        jit=jit,
    )
    try:
        sums = engine.run_steps(step_fn, batches, n, 0, short_ok=False)
    except engine.op_error as e:
        engine.explain(e, phase.name)
    seconds = time.perf_counter() - start
    if not np.isfinite(sums["loss"]):
        raise TrainingError(
            f"phase {phase.name!r}: non-finite loss in the dry run; lower "
            f"phases.{phase.name}.learning_rate"
        )
    return {
        "name": phase.name,
        "epochs": phase.epochs,
        "steps_per_epoch": input_pipeline.phase_steps(spec, phase),
        "trainable_from": phase.trainable_from,
        "trainable_params": trainable,
        "jit_compile": jit,
        "checkpoint_bytes": _nbytes(optimizer.variables),
        "dry_run": f"{n} steps of batch {batch} in {seconds:.1f}s, "
        f"loss {sums['loss'] / sums['count']:.3f}",
    }


def _nbytes(variables) -> int:
    """Bytes of `variables` in a checkpoint (float32)."""
    return sum(int(np.prod(v.shape)) * 4 for v in variables)


def _print_plan(plan: dict[str, Any]) -> None:
    width = max(len(k) for k in plan)
    for key, value in plan.items():
        if key != "phases":
            print(f"{key:<{width}}  {value}")
    for p in plan["phases"]:
        print(f"phase {p['name']}:")
        for key, value in p.items():
            if key == "name":
                continue
            shown = value
            if isinstance(value, int) and not isinstance(value, bool):
                shown = f"{value:,}"
            if key == "checkpoint_bytes":
                shown = f"{value / 2**20:.1f} MiB"
            print(f"  {key:<18}{shown}")
    print("check passed: nothing was written to the workdir")
