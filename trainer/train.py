"""`run(spec, workdir)`: the two-phase training loop, resumable at any step."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import re
import sys
import time
from typing import Any

from trainer import backend

backend.prepare_keras()  # Before Keras: picks its backend, mutes TensorFlow.

import keras  # noqa: E402
import numpy as np  # noqa: E402

from trainer import (  # noqa: E402
    checkpoint,
    config,
    export,
    input_pipeline,
    models,
    preemption,
    reports,
    runtime,
    step_math,
    storage,
    workdir,
)
from trainer.errors import (  # noqa: E402
    SpecChangedError,
    SpecError,
    StorageError,
    TrainingError,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore exactly.

    The global step is the one progress counter. The phase is the number of
    phase boundaries passed; the epoch and the step in it follow from the
    global step and the step at which the current phase began.
    """

    global_step: int = 0
    # The global step at which each phase began: the current phase is the
    # last entry (len(spec.phases) + 1 entries once every phase is done).
    phase_starts: list[int] = dataclasses.field(default_factory=lambda: [0])
    # Partial sums of the current epoch's training metrics (a resumed epoch
    # reports the same numbers as an uninterrupted one).
    train_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    epochs_without_improvement: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    optimizer_phase: int | None = None  # phase the saved optimizer slots belong to
    confusion: list[list[float]] = dataclasses.field(default_factory=list)
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    shape_hash: str = ""
    # Records skipped as corrupt so far; saved as its entries().
    corrupt: input_pipeline.CorruptTally = dataclasses.field(
        default_factory=input_pipeline.CorruptTally
    )

    @property
    def phase_index(self) -> int:
        return len(self.phase_starts) - 1

    def position(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epoch, step in the epoch) of the current phase.

        An epoch trained to its last step but not yet validated (a checkpoint
        taken right there) still holds its training sums: it is that epoch's
        end, not the next one's start.
        """
        epoch, step = divmod(self.global_step - self.phase_starts[-1], steps_per_epoch)
        if step == 0 and epoch > 0 and self.train_sums:
            return epoch - 1, steps_per_epoch
        return epoch, step


def itstime(step: int, every: int) -> bool:
    """Whether a periodic action is due at `step` (big_vision's `itstime`)."""
    return every > 0 and step > 0 and step % every == 0


def steps_until(step: int, every: int) -> int:
    """Steps from `step` to the next one at which `itstime(.., every)` holds."""
    return every - step % every


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
    storage.check_url(workdir)  # `gs:/b/run` would train onto the local disk.
    # Before anything imports Keras' backend-specific parts; a notebook whose
    # Keras runs on another backend stops here (exit 2), before any work.
    backend_name = backend.select(spec.runtime.backend)
    done = reports.completed_summary(workdir)
    # Class names from the shards' manifest (trainer convert's folder names),
    # recorded in job.json with the spec, when the spec names none.
    spec = input_pipeline.with_class_names(spec)
    if done is not None:
        print(
            f"{workdir} already completed at step {done['global_step']}: "
            f"{json.dumps(done['metrics'])}"
        )
        _note_spec_ignored(spec, workdir)
        return done
    with setup_runtime(spec, backend_name) as rt:
        ckpt = checkpoint.CheckpointManager(
            workdir,
            keep=spec.train.keep_checkpoints,
            monitor=spec.train.monitor,
            mode="max" if spec.train.monitor == "val_accuracy" else "min",
            is_chief=rt.is_chief,
        )
        try:
            summary = _resume_and_train(
                spec,
                workdir,
                rt,
                ckpt,
                deadline_seconds=deadline_seconds,
                metadata_url=metadata_url,
            )
            ckpt.close()
            return summary
        except BaseException as e:
            ckpt.close(raise_errors=False)  # The error in flight says more.
            _say_where_it_stands(e, workdir, ckpt)
            raise


@contextlib.contextmanager
def setup_runtime(spec, backend_name: str = "tensorflow"):
    """`runtime.setup` for a job; workers that never came up stop this one as
    preempted (exit 75): Vertex AI restarts it, and rerunning once they are up
    works."""
    setup = runtime.setup(
        spec.runtime,
        deterministic=spec.train.deterministic,
        seed=spec.train.seed,
        backend_name=backend_name,
    )
    with contextlib.ExitStack() as stack:
        try:
            rt = stack.enter_context(setup)
        except runtime.PeersMissing as e:
            raise preemption.Preempted(str(e), durable=False) from None
        yield rt


def _resume_and_train(spec, root, rt, ckpt, *, deadline_seconds, metadata_url):
    """Resume precedence, then the loop.

    1. The workdir's newest valid checkpoint (older ones when it is damaged).
    2. Otherwise the spec's pretrained weights (`model.weights`), head from
       the seed.
    """
    check_batch(spec, rt)
    check_backend(spec, rt)
    check_data(spec)
    _record_spec(spec, root, rt.is_chief)
    ckpt.claim()
    if spec.train.deterministic:
        # Again, right before the model draws its initial weights and seeds:
        # the storage clients' retry jitter (gcsfs' backoff) draws from
        # Python's global `random` too, so a retried request above would
        # otherwise change the model a run starts from.
        keras.utils.set_random_seed(spec.train.seed)
    engine = make_engine(rt)
    with engine.scope():
        model = models.build_model(spec)
    for phase in spec.phases:  # A typo in phase 2 fails now, not in an hour.
        set_trainable(model, spec, phase)
    check_feature_cache(spec, rt, model)
    state, arrays = _restore(ckpt, spec)
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
    logs = reports.Logs(root, rt.is_chief)
    watcher.start()
    try:
        loop = _Run(
            spec=spec,
            root=root,
            rt=rt,
            engine=engine,
            ckpt=ckpt,
            model=model,
            state=state,
            watcher=watcher,
            logs=logs,
        )
        return loop.train(arrays)
    finally:
        watcher.stop()
        logs.close()


def check_data(spec) -> None:
    """Both splits resolve: shards match each glob, the training split holds a
    batch. Checked before job.json and the claim are written, so a run refused
    for its data leaves the workdir as it found it (a fixed spec may differ)."""
    input_pipeline.steps_per_epoch(spec)
    input_pipeline.split_info(spec, "validation")
    input_pipeline.check_class_count(spec)


def check_backend(spec, rt: runtime.Runtime) -> None:
    """What the spec asks of the backend, before the model is built: the
    feature cache feeds tf.distribute, and the JAX backend trains on images."""
    if rt.backend == "jax" and spec.data.cache_features is True:
        raise SpecError(
            "data.cache_features = true cannot be used with runtime.backend = "
            '"jax" (it trains on images); set data.cache_features = "auto" '
            '(or false), or runtime.backend = "tensorflow"'
        )


def check_feature_cache(spec, rt: runtime.Runtime, model) -> None:
    """`data.cache_features = true` needs a phase that can use the cache
    (on TensorFlow: check_backend refuses it on JAX)."""
    if rt.backend == "jax":
        return
    from trainer import feature_cache

    feature_cache.check_spec(spec, rt, model)


def make_engine(rt: runtime.Runtime):
    """The backend's steps, data and error handling (steps.Engine for
    TensorFlow, jax_steps.Engine for JAX), imported only when used."""
    if rt.backend == "jax":
        from trainer import jax_steps

        return jax_steps.Engine(rt)
    from trainer import steps

    return steps.Engine(rt)


def _say_where_it_stands(e: BaseException, root: str, ckpt) -> None:
    """Adds the step a rerun resumes from to a failure a user can act on: our
    own kinds are raised again reworded; a store that could not be reached
    keeps its exit 1 (no contract code fits an outage: a spot VM's script
    retries 1 and gives up on 2) and gets it as a note below its traceback."""
    if isinstance(e, (StorageError, TrainingError)):
        raise type(e)(f"{e}. {_durable_note(ckpt)}") from e
    if isinstance(e, Exception) and storage.unreachable(e):
        e.add_note(f"{root}: {_durable_note(ckpt)}")


def _durable_note(ckpt) -> str:
    """Where a run that failed stands: the step that running again resumes from."""
    step = ckpt.committed_step
    if step is None:
        return "No checkpoint was committed yet: running again starts over"
    return (
        f"The last durable checkpoint is step {step} ({ckpt.checkpoint_url(step)}): "
        "once fixed, run the same command again to resume from it"
    )


@dataclasses.dataclass
class _Run:
    """One run of the loop: what it trains, where it writes, and its state."""

    spec: config.JobSpec
    root: str  # The workdir.
    rt: runtime.Runtime
    ckpt: checkpoint.CheckpointManager
    model: keras.Model
    state: TrainState
    watcher: preemption.PreemptionWatcher
    logs: reports.Logs
    engine: Any  # steps.Engine or jax_steps.Engine: see make_engine.
    started: bool = False  # Whether this process ran a training step yet.

    @property
    def phase(self) -> config.PhaseConfig:
        """The current phase (the last one once every phase is done)."""
        return self.spec.phases[min(self.state.phase_index, len(self.spec.phases) - 1)]

    def train(self, arrays) -> dict[str, Any]:
        """The phases from the state on, then the export; the summary of the run."""
        self._record_backend()
        try:
            if arrays is not None and self.state.phase_index >= len(self.spec.phases):
                # Trained, but not yet exported: the model weights are all we need.
                models.assign_variables(self.model, None, _model_arrays(arrays))
            while self.state.phase_index < len(self.spec.phases):
                self._train_phase(arrays)
                arrays = None  # Restored slots belong to one phase only.
            return self._finish()
        except self.engine.op_error as e:
            gone = self._peer_gone(e)
            if gone is not None:
                self._write_preempted_summary()
                raise gone from None
            self.engine.explain(e, self.phase.name)
        except preemption.Preempted:
            self._write_preempted_summary()
            raise

    def _record_backend(self) -> None:
        """The backend goes into every checkpoint; a resume on the other one
        says so (weights, slots and counters carry over, numerics differ
        within float32 rounding: see tests/test_backends.py)."""
        before = self.state.runtime.get("backend", "tensorflow")
        if self.state.global_step and before != self.engine.name:
            print(
                f"note: resuming a checkpoint written on the {before} backend on "
                f"{self.engine.name}"
            )
        self.state.runtime["backend"] = self.engine.name

    def _write_preempted_summary(self) -> None:
        if self.rt.is_chief:
            last = self.state.history[-1] if self.state.history else {}
            reports.write_summary(self.root, self._summary("preempted", last))

    def _peer_gone(self, e: Exception) -> preemption.Preempted | None:
        """A collective that lost a worker stops this one too, as preempted.

        Nothing is saved: the failed call may have updated some of its steps'
        variables. Running again (on every worker) resumes from the last
        committed checkpoint, as after a kill -9.
        """
        lost = self.engine.lost_peer_errors
        if self.rt.workers == 1 or not isinstance(e, lost):
            return None
        text = str(e)
        cause = re.search(
            r"Collective ops is aborted by: ([^\n]*:\n[^\n]*|[^\n]*)", text
        )
        detail = " ".join(cause.group(1).split()) if cause else type(e).__name__
        tasks = re.findall(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)", text)
        peers = sorted({runtime.task_address(job, int(i)) for job, i in tasks})
        step = self.ckpt.committed_step
        return preemption.Preempted(
            f"a worker of this run is gone (peers named: {', '.join(peers) or 'none'};"
            f" {detail[:300]})"
            + ("" if step is None else f"; the last durable checkpoint is step {step}")
        )

    def _train_phase(self, arrays) -> None:
        """One phase from the state on: epochs of steps, validation, checkpoints."""
        spec, phase = self.spec, self.phase
        if phase.epochs == 0:
            self._skip_phase(phase, arrays)
            return
        set_trainable(self.model, spec, phase)
        jit = self._jit(phase)
        optimizer = self._optimizer(phase, arrays)
        per_epoch = input_pipeline.phase_steps(spec, phase)
        self._print_phase(phase, jit, per_epoch)
        # After the restore: the cache key hashes the backbone's weights.
        features = self._features(phase, per_epoch)
        forward = None
        if features is not None:  # The head alone, on the cached features.
            forward = functools.partial(models.apply_head, self.model)
        train_fn = self.engine.make_train_step(
            self.model,
            optimizer,
            num_classes=spec.data.num_classes,
            global_batch=spec.train.global_batch_size,
            jit=jit,
            forward=forward,
        )
        eval_fn = self.engine.make_eval_step(
            self.model, num_classes=spec.data.num_classes, forward=forward
        )
        while (epoch := self.state.position(per_epoch)[0]) < phase.epochs:
            self._train_epoch(train_fn, optimizer, per_epoch, features)
            if self._end_epoch(eval_fn, optimizer, epoch, features):
                break  # Early stopping.
        # Phase boundary: the next start resumes with the next phase's fresh optimizer.
        self.state.phase_starts.append(self.state.global_step)
        self.state.epochs_without_improvement = 0
        history = self.state.history
        self._save(None, metric=history[-1][spec.train.monitor] if history else None)

    def _features(self, phase, per_epoch: int):
        """The cached features {split: Features} this phase trains on, or None."""
        if self.state.position(per_epoch)[0] >= phase.epochs:
            return None  # Resumed at the phase's end: nothing left to train.
        if self.engine.name == "jax":
            return None  # See check_feature_cache.
        from trainer import feature_cache

        decision = feature_cache.decide(self.spec, phase, self.rt, self.model)
        print(f"phase {phase.name!r} on cached features: {decision.describe()}")
        if not decision.use:
            return None
        return feature_cache.load_or_build(
            self.spec, self.model, self.rt, self.root, decision.dtype
        )

    def _skip_phase(self, phase, arrays) -> None:
        """`epochs = 0`: the phase trains nothing; the run goes on to the next."""
        print(f"phase {phase.name!r} skipped (epochs = 0)")
        if arrays is not None:  # Resumed at its start: the weights still count.
            models.assign_variables(self.model, None, _model_arrays(arrays))
        self.state.phase_starts.append(self.state.global_step)

    def _train_epoch(self, train_fn, optimizer, per_epoch: int, features) -> None:
        """The current epoch's remaining steps, with periodic and preemption saves."""
        spec, state = self.spec, self.state
        epoch, step = state.position(per_epoch)
        iterator = self.engine.train_batches(
            spec,
            epoch=self._epoch_key(epoch),
            start_step=step,
            batches=per_epoch - step,
            tally=state.corrupt,
            features=features,
        )
        print(f"{self.phase.name} epoch {epoch + 1}/{self.phase.epochs}")
        bar = keras.utils.Progbar(per_epoch, verbose=_progbar_verbosity())
        bar.update(step)
        every = spec.train.checkpoint_every_steps
        while step < per_epoch:
            n = min(
                spec.train.steps_per_execution,
                per_epoch - step,
                steps_until(state.global_step, every),
            )
            sums = self._run_steps(train_fn, iterator, n)
            if sums is None:  # The data ran out: the epoch ends here.
                state.global_step += per_epoch - step
                return
            agreed = sums.pop("stop", 0) > 0
            step += n
            state.global_step += n
            step_math.accumulate(state.train_sums, sums)
            bar.update(step, step_math.train_metrics(state.train_sums).items())
            self._check_finite(sums["loss"])
            self._stop_if_preempted(optimizer, agreed=agreed)
            if itstime(state.global_step, every):
                self._save(optimizer)

    def _run_steps(self, train_fn, iterator, n: int) -> dict[str, Any] | None:
        """`n` training steps' sums; None when the epoch's data ran out first."""
        # Several workers: what this one was told goes to all (see
        # `_stop_if_preempted`).
        flag = int(self.rt.workers > 1 and self.watcher.reason() is not None)
        # With data.on_corrupt = "skip", undecodable images are dropped inside
        # tf.data, so the epoch can be short of batches. The global step still
        # moves to the epoch's end: positions stay the schedule's.
        short_ok = self.spec.data.on_corrupt == "skip"
        sums = self.engine.run_steps(train_fn, iterator, n, flag, short_ok=short_ok)
        if sums is None:
            log.warning("epoch ended early: records were skipped")
            print(
                "\nwarning: epoch ended early (corrupt records skipped; see "
                "summary.json corrupt_records)"
            )
            return None
        if not self.started:  # benchmarks/resume.py reads this line.
            self.started = True
            print(
                f"first step done after "
                f"{time.time() - preemption.process_start_time():.1f}s "
                f"(global step {self.state.global_step + n})"
            )
        return sums

    def _check_finite(self, loss: float) -> None:
        if not np.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss at global step {self.state.global_step} "
                f"(phase {self.phase.name!r}); lower "
                f"phases.{self.phase.name}.learning_rate"
            )

    def _stop_if_preempted(self, optimizer, *, agreed: bool) -> None:
        """Saves and stops when this worker, or with several, any worker must.

        Several workers stop only when they agreed to (the `stop` sum of the
        last call): a worker told to stop passes its flag into the next call,
        and all of them stop after that call, at one step.
        """
        reason = self.watcher.reason()
        if self.rt.workers > 1:
            reason = (reason or "another worker was told to stop") if agreed else None
        if reason:
            step = self.state.global_step
            print(f"\n{reason}: saving a checkpoint at step {step} and stopping")
            self._save(optimizer, blocking=True)
            raise preemption.Preempted(reason)

    def _end_epoch(self, eval_fn, optimizer, epoch: int, features) -> bool:
        """Validation, the epoch's record and checkpoint; True to stop early."""
        spec, state = self.spec, self.state
        val = self.engine.evaluate(
            eval_fn,
            spec,
            state.corrupt,
            self._epoch_key(epoch),
            features=None if features is None else features["validation"],
        )
        record = {
            "phase": self.phase.name,
            "epoch": epoch + 1,
            "global_step": state.global_step,
            **step_math.train_metrics(state.train_sums),
            "val_loss": val["val_loss"],
            "val_accuracy": val["val_accuracy"],
        }
        reports.print_record(record)
        state.history.append(record)
        state.confusion = np.asarray(val["confusion"]).tolist()
        state.train_sums = {}
        self.logs.write(record, state.global_step)
        if self.rt.is_chief:  # Progress a user (or a dashboard) can poll.
            reports.write_summary(self.root, self._summary("running", record))
        if _update_best(spec, state, record[spec.train.monitor]):
            print(
                f"early stopping: {spec.train.monitor} did not improve for "
                f"{spec.train.early_stopping_patience} epochs"
            )
            return True
        if epoch + 1 < self.phase.epochs:
            self._save(optimizer, metric=record[spec.train.monitor])
        return False

    def _finish(self) -> dict[str, Any]:
        """Waits for the last checkpoint, then exports, plots and summarizes."""
        self.ckpt.wait()
        last = self.state.history[-1] if self.state.history else {}
        summary = self._summary("completed", last)
        if self.rt.is_chief:
            self.ckpt.check_owner(
                self.state.global_step, "exporting and summarizing the run"
            )
            # From a committed checkpoint, the best or the last (train.export),
            # as `trainer export` would: the in-memory weights are the last ones.
            step, weights = export.choose_step(
                self.root, self.spec, best=self.state.best_step
            )
            summary["export"] = export.export_step(
                self.root,
                self.spec,
                step,
                weights,
                saved_model=self.spec.train.export_saved_model,
            )
            reports.plot_history(self.state.history, self.root)
            reports.plot_confusion(
                self.state.confusion, self.spec.class_names(), self.root
            )
            reports.write_summary(self.root, summary)
        reports.print_final(summary, self.spec.train.monitor, self.spec.name)
        return summary

    def _summary(self, status: str, metrics: dict[str, Any]) -> dict[str, Any]:
        state, monitor = self.state, self.spec.train.monitor
        return {
            "status": status,
            "name": self.spec.name,
            "backend": self.engine.name,
            "phase": self.phase.name,
            "global_step": state.global_step,
            "last_durable_step": self.ckpt.last_durable_step,
            "metrics": {
                k: v
                for k, v in metrics.items()
                if k not in ("phase", "epoch", "global_step")
            },
            "best": {monitor: state.best_metric, "global_step": state.best_step},
            "corrupt_records": state.corrupt.summary(),
            "history": state.history,
        }

    def _jit(self, phase) -> bool:
        """The phase's jit_compile; on resume, the choice recorded in the checkpoint."""
        if self.rt.backend == "jax":
            # JAX compiles every phase's step (op by op it would crawl); the
            # recorded choices are TensorFlow's, kept for a resume there.
            if self.spec.phase_jit(phase) is False:
                print(
                    f"note: jit_compile = false for phase {phase.name!r} is for "
                    "TensorFlow: the JAX backend compiles every step"
                )
            return True
        recorded = self.state.runtime.get("jit", {}).get(phase.name)
        unsupported = models.jit_unsupported(self.rt.device_type, self.rt.num_replicas)
        if recorded and unsupported:  # Resumed on other hardware.
            print(f"note: phase {phase.name!r} continues without XLA: {unsupported}")
        elif recorded is not None:
            return bool(recorded)
        jit = resolve_jit(self.spec, phase, self.rt)
        self.state.runtime.setdefault("jit", {})[phase.name] = jit
        return jit

    def _optimizer(self, phase, arrays):
        """The phase's optimizer, with its slots restored if they are its own."""
        with self.engine.scope():
            optimizer = step_math.make_optimizer(
                self.spec.train.optimizer, phase.learning_rate, self.rt.precision
            )
            optimizer.build(self.model.trainable_variables)
        if arrays is not None:
            same_phase = self.state.optimizer_phase == self.state.phase_index
            if not same_phase:  # Slots of another phase's optimizer: start fresh.
                arrays = _model_arrays(arrays)
            models.assign_variables(
                self.model, optimizer if same_phase else None, arrays
            )
        self.state.optimizer_phase = self.state.phase_index
        return optimizer

    def _print_phase(self, phase, jit: bool, per_epoch: int) -> None:
        rt, index = self.rt, self.state.phase_index
        trainable = models.count_params(self.model)["trainable"]
        print(
            f"phase {phase.name!r} ({index + 1}/{len(self.spec.phases)}): "
            f"trainable_from={phase.trainable_from!r}, trainable params "
            f"{trainable:,}, lr {phase.learning_rate:g}, jit_compile={jit}, "
            f"{per_epoch} steps/epoch x {phase.epochs} epochs, "
            f"{rt.strategy_name} x{rt.num_replicas}, backend {self.engine.name}"
        )

    def _epoch_key(self, epoch: int) -> int:
        """A global epoch number: distinct shuffles for every epoch of every phase."""
        earlier = self.spec.phases[: self.state.phase_index]
        return sum(p.epochs for p in earlier) + epoch

    def _save(self, optimizer, *, metric=None, blocking=False) -> None:
        """Checkpoints model (and the phase's optimizer) with the loop state.

        The snapshot is a callable so the manager takes it only once the previous
        upload is done: at most two copies of the state are ever in host memory.
        """
        self.engine.sync()  # JAX: the variables take the step's values first.
        state = self.state
        # asdict deep-copies fields; the tally (with its lock) goes as its entries.
        payload = dataclasses.asdict(dataclasses.replace(state, corrupt=None))
        payload["corrupt"] = state.corrupt.entries()
        payload["optimizer_phase"] = (
            None if optimizer is None else state.optimizer_phase
        )
        self.ckpt.save(
            state.global_step,
            lambda: models.device_snapshot(self.model, optimizer),
            payload,
            best_step=state.best_step,
            metric=metric,
            blocking=blocking,
        )


def _update_best(spec, state: TrainState, value: float) -> bool:
    """Tracks the best monitored value; True when early stopping should fire.

    The one home of the best step: checkpoint retention keeps the step
    recorded here.
    """
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


def _model_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k.startswith("model/")}


def _progbar_verbosity() -> int:
    """A live bar on terminals and notebooks; one line per epoch in log files."""
    interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
    return 1 if interactive else 2


def set_trainable(model, spec, phase) -> None:
    """Freezes the backbone below the phase's `trainable_from` layer."""
    try:
        models.set_trainable(model, spec.model.backbone, phase.trainable_from)
    except ValueError as e:
        raise SpecError(f"phases.{phase.name}.{e}") from None


def check_batch(spec, rt: runtime.Runtime) -> None:
    """Each batch splits evenly over the replicas; exit 2 naming both numbers."""
    n = rt.num_replicas
    for key, size in (
        ("train.global_batch_size", spec.train.global_batch_size),
        ("train.eval_batch_size", spec.train.eval_batch_size),
    ):
        if size and size % n:
            raise SpecError(
                f"{key} = {size} does not split over the {n} replicas of this run "
                f"({rt.strategy_name} x{n}); set it to a multiple of {n}, e.g. "
                f"{size // n * n or n}"
            )


def resolve_jit(spec, phase, rt: runtime.Runtime) -> bool:
    """`jit_compile` for a phase: the spec's value, or the fixed `auto` rule.

    Raises:
      SpecError: `jit_compile = true` where XLA cannot compile the step.
    """
    value = spec.phase_jit(phase)
    if value == "auto":
        return models.jit_rule(phase.trainable_from, rt.device_type, rt.num_replicas)
    unsupported = models.jit_unsupported(rt.device_type, rt.num_replicas)
    if value and unsupported:
        key = (
            "train.jit_compile"
            if phase.jit_compile is None
            else f"phases.{phase.name}.jit_compile"
        )
        raise SpecError(
            f"{key} = true cannot run phase {phase.name!r}: {unsupported}; set "
            f'{key} = "auto" (or false) to train this phase without XLA'
        )
    return bool(value)


# ---------------------------------------------------------------------------
# Resume


def _restore(ckpt, spec) -> tuple[TrainState, dict | None]:
    """The newest valid checkpoint's state and arrays; a fresh state if none."""
    restored = ckpt.restore()
    if restored is None:
        return TrainState(shape_hash=spec.shape_hash()), None
    arrays, saved = restored
    state = _state_from(saved, spec)
    if state.shape_hash and state.shape_hash != spec.shape_hash():
        raise SpecChangedError(
            f"checkpoint step {state.global_step} was written for a different model "
            "shape; see job.json in the workdir"
        )
    phase = spec.phases[min(state.phase_index, len(spec.phases) - 1)]
    epoch, step = (0, 0)
    if state.phase_index < len(spec.phases):
        epoch, step = state.position(input_pipeline.phase_steps(spec, phase))
    print(
        f"resuming from step {state.global_step}: phase {phase.name!r}, "
        f"epoch {epoch + 1}, step {step} in the epoch"
    )
    return state, arrays


def _state_from(saved: dict[str, Any], spec) -> TrainState:
    """A TrainState from a checkpoint's state.json, this release's or the first's."""
    fields = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in saved.items() if k in fields})
    state.corrupt = input_pipeline.CorruptTally(saved.get("corrupt", ()))
    if "phase_starts" not in saved and "phase_index" in saved:
        # The first release saved (phase, epoch, step in epoch) besides the
        # global step: where its current phase began follows from them.
        index = saved["phase_index"]
        into = 0
        if index < len(spec.phases):
            per_epoch = input_pipeline.phase_steps(spec, spec.phases[index])
            into = saved["epoch"] * per_epoch + saved["step"]
        state.phase_starts = [0] * index + [state.global_step - into]
    return state


def _record_spec(spec, root, is_chief) -> None:
    """Writes job.json on the first run; refuses shape-changing edits later."""
    if not check_recorded_spec(spec, root) and is_chief:
        storage.write_json(workdir.job(root), spec.to_dict())


def _note_spec_ignored(spec, root) -> None:
    """A completed run trains no more: say so when this spec asks for more."""
    url = workdir.job(root)
    if not storage.exists(url):
        return
    changed = _diff(storage.read_json(url), spec.to_dict())
    if changed:
        print(
            f"note: this spec differs from the completed run's ({', '.join(changed)}) "
            "and was not trained: use a new --workdir to train it"
        )


def check_recorded_spec(spec, root) -> bool:
    """Compares `spec` with the first run's job.json: refuses shape-changing
    edits, notes the others; False when `root` holds no job.json yet.

    Raises:
      SpecChangedError: naming the keys, their values, and the remedy.
    """
    url = workdir.job(root)
    if not storage.exists(url):
        return False
    first = config.from_dict(storage.read_json(url))
    old, new = first.shape_fingerprint(), spec.shape_fingerprint()
    changed = [k for k in new if old.get(k) != new.get(k)]
    if changed:
        lines = "; ".join(
            f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in changed
        )
        raise SpecChangedError(
            f"cannot resume {root} with a different model shape ({lines}); "
            "use a new --workdir, or restore the original values"
        )
    was, now = first.train.global_batch_size, spec.train.global_batch_size
    if was != now:
        raise SpecChangedError(
            f"cannot resume {root} with train.global_batch_size = {now} (it was "
            f"{was}): the run's position is counted in its batches, so another "
            f"batch would train part of an epoch twice; keep {was} (it is split "
            "over the replicas: a machine with fewer of them runs more per "
            "replica), or use a new --workdir"
        )
    for key, (a, b) in _diff(first.to_dict(), spec.to_dict()).items():
        log.warning("spec change on resume: %s: %r -> %r", key, a, b)
        print(f"note: spec changed since the first run: {key}: {a!r} -> {b!r}")
    return True


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
