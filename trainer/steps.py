"""The TensorFlow backend's steps: a `tf.function` of n training steps, and
evaluation, per strategy; `Engine` puts them behind the loop's backend seam."""

from __future__ import annotations

from typing import Any

from trainer import backend

tf = backend.import_tensorflow()  # Before Keras, which imports it loudly.

import keras  # noqa: E402

from trainer import input_pipeline  # noqa: E402
from trainer.errors import SpecError  # noqa: E402
from trainer.step_math import (  # noqa: E402, F401  (steps.make_optimizer etc.)
    accumulate,
    eval_metrics,
    make_optimizer,
    train_metrics,
)


def classes(outputs, num_classes: int):
    """Class ids from the head's output: argmax of the softmax, or sigmoid > 0.5."""
    if num_classes == 1:
        return tf.cast(tf.reshape(outputs, (-1,)) > 0.5, tf.int32)
    return tf.argmax(outputs, axis=-1, output_type=tf.int32)


def per_example(num_classes: int, labels, outputs):
    """Per-example loss, correctness and class, in float32 whatever the compute dtype."""
    outputs = tf.cast(outputs, tf.float32)
    if num_classes == 1:
        y = tf.cast(tf.reshape(labels, (-1, 1)), tf.float32)
        loss = keras.losses.binary_crossentropy(y, outputs)
    else:
        loss = keras.losses.sparse_categorical_crossentropy(labels, outputs)
    pred = classes(outputs, num_classes)
    correct = tf.cast(tf.equal(pred, tf.cast(labels, tf.int32)), tf.float32)
    return loss, correct, pred


def make_train_step(
    model,
    optimizer,
    strategy,
    *,
    num_classes,
    global_batch,
    jit,
    agree=True,
    forward=None,
):
    """A `tf.function` running `n` steps (steps_per_execution) per call.

    Every step also sums the caller's stop flag over all replicas of all
    workers, as a fourth number in the all-reduce of the step's sums (so it
    costs no extra collective): every worker learns whether any worker must
    stop (SIGTERM, the GCE notice, its deadline), and all stop after the same
    call instead of leaving the others waiting in a collective for a peer
    that has gone.

    Returns:
      `train_steps(iterator, n, flag)` -> {"loss", "correct", "count",
      "stop"}: sums over the `n` global batches; "stop" > 0 when any
      worker's flag was set (never, with `agree=False`: the flag is left out
      of the all-reduce; benchmarks/scaling.py measures the difference).
      `forward(inputs, training=...)` computes the outputs (default: the
      model on images; the head on cached features, feature_cache.py).
    """
    forward = model if forward is None else forward

    def replica_step(images, labels, flag):
        # Watch only what this phase trains. Keras' frozen layers keep their
        # tf.Variables "trainable" underneath, so a default tape would record
        # the whole backbone and put its backward pass into the graph (XLA then
        # compiles it, and op determinism rejects its MaxPool gradient).
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch([v.value for v in model.trainable_variables])
            outputs = forward(tf.cast(images, tf.float32), training=True)
            loss, correct, _ = per_example(num_classes, labels, outputs)
            # Sum over the replica's examples / the global batch: summed across
            # replicas this is the mean over the global batch.
            scaled = tf.reduce_sum(loss) / global_batch
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                scaled = optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        count = tf.cast(tf.shape(labels)[0], tf.float32)
        # One vector, so the sums and the flag cross the replicas in one all-reduce.
        sums = [tf.reduce_sum(loss), tf.reduce_sum(correct), count]
        return tf.stack(sums + ([tf.cast(flag, tf.float32)] if agree else []))

    replica_fn = tf.function(replica_step, jit_compile=jit) if jit else replica_step
    return _n_steps(strategy, replica_fn, agree)


def _n_steps(strategy, replica_fn, agree: bool):
    """`train_steps(iterator, n, flag)`: `n` replica steps, their sums all-reduced."""

    def reduce(value):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    @tf.function
    def train_steps(iterator, n, flag):
        totals = tf.zeros([4 if agree else 3])
        for _ in tf.range(n):
            images, labels = next(iterator)
            totals += reduce(strategy.run(replica_fn, args=(images, labels, flag)))
        names = ("loss", "correct", "count", "stop")[: 4 if agree else 3]
        out = dict(zip(names, tf.unstack(totals), strict=True))
        return {"stop": tf.constant(0.0), **out}

    return train_steps


def make_eval_step(model, strategy, *, num_classes: int, forward=None):
    """A `tf.function` of one weighted validation batch: sums and confusion matrix.

    `forward` as for `make_train_step`.
    """
    matrix_size = max(num_classes, 2)
    forward = model if forward is None else forward

    def replica_step(images, labels, weights):
        outputs = forward(tf.cast(images, tf.float32), training=False)
        loss, correct, pred = per_example(num_classes, labels, outputs)
        confusion = tf.math.confusion_matrix(
            tf.cast(labels, tf.int32),
            pred,
            num_classes=matrix_size,
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


def evaluate(
    eval_fn, spec, strategy, tally=None, pass_key=0, features=None
) -> dict[str, Any]:
    """`val_loss`, `val_accuracy` and the confusion matrix over `data.validation`.

    With `features` (the split's cached features) the batches hold those.
    """

    def dataset_fn(ctx):
        kwargs = {"input_context": ctx, "tally": tally, "pass_key": pass_key}
        if features is None:
            return input_pipeline.eval_dataset(spec, **kwargs)
        return input_pipeline.feature_eval_dataset(spec, features, **kwargs)

    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    total: dict[str, Any] = {}
    for images, labels, weights in dataset:
        accumulate(total, to_numpy(eval_fn(images, labels, weights)))
    return eval_metrics(total)


def explain_determinism(e: Exception, phase_name: str) -> None:
    """Op determinism has no XLA kernel for some gradients: say which keys to change."""
    if isinstance(e, tf.errors.UnimplementedError) and "deterministic" in str(e):
        lines = str(e).strip().splitlines()
        detail = next(
            (ln for ln in lines if "deterministic" in ln), lines[0] if lines else ""
        )
        raise SpecError(
            f"train.deterministic = true cannot run phase {phase_name!r} with XLA "
            f"({detail.strip()}); set phases.{phase_name}.jit_compile = false, or "
            "train.deterministic = false"
        ) from None


def local_replicas(ctx) -> int:
    """Replicas fed by one input pipeline: each takes one element per step."""
    return ctx.num_replicas_in_sync // ctx.num_input_pipelines


def to_numpy(tensors: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.numpy() if v.shape.rank else float(v.numpy())) for k, v in tensors.items()
    }


class Engine:
    """The TensorFlow backend as `train._Run` drives it (jax_steps.Engine is
    the JAX one): a tf.distribute strategy and `tf.function` steps, whose
    variables are the Keras model's and optimizer's own."""

    name = "tensorflow"
    # What the loop catches from the steps and the input: every OpError, and
    # the ones of a collective that lost a worker.
    op_error = tf.errors.OpError
    lost_peer_errors = (
        tf.errors.UnavailableError,
        tf.errors.DeadlineExceededError,
        tf.errors.CancelledError,
        tf.errors.AbortedError,
    )

    def __init__(self, rt):
        self.rt = rt
        self._model_eval = None  # (model, its eval step): see make_eval_step.

    def scope(self):
        return self.rt.strategy.scope()

    def make_train_step(self, model, optimizer, **kwargs):
        return make_train_step(model, optimizer, self.rt.strategy, **kwargs)

    def make_eval_step(self, model, *, num_classes: int, forward=None):
        """The whole model's eval step is made once and kept for every phase:
        inference (training=False) does not depend on which layers train,
        and a new `tf.function` would be traced again (about a second a
        phase for MobileNetV2 on CPU). The head on cached features gets its own."""
        if forward is not None:
            return make_eval_step(
                model, self.rt.strategy, num_classes=num_classes, forward=forward
            )
        if self._model_eval is None or self._model_eval[0] is not model:
            fn = make_eval_step(model, self.rt.strategy, num_classes=num_classes)
            self._model_eval = (model, fn)
        return self._model_eval[1]

    def train_batches(self, spec, *, epoch, start_step, batches, tally, features):
        """`batches` training batches of the epoch from `start_step` on,
        distributed over the replicas; with `features`, the same records'
        cached features in the same order."""

        def dataset_fn(ctx):
            kwargs = {
                "epoch": epoch,
                "start_step": start_step,
                "input_context": ctx,
                "tally": tally,
            }
            if features is None:
                ds = input_pipeline.train_dataset(spec, **kwargs)
            else:
                ds = input_pipeline.feature_train_dataset(
                    spec, features["train"], **kwargs
                )
            return ds.take(batches * local_replicas(ctx))

        return iter(self.rt.strategy.distribute_datasets_from_function(dataset_fn))

    def run_steps(self, train_fn, iterator, n: int, flag: int, *, short_ok: bool):
        """`n` steps' sums; None when the data ran out first and `short_ok`."""
        try:
            return to_numpy(train_fn(iterator, tf.constant(n), tf.constant(flag)))
        except tf.errors.OutOfRangeError:
            if not short_ok:
                raise
            return None

    def evaluate(self, eval_fn, spec, tally, pass_key, features):
        return evaluate(eval_fn, spec, self.rt.strategy, tally, pass_key, features)

    def sync(self) -> None:
        """Nothing to do: the steps update the Keras variables themselves."""

    def explain(self, e: Exception, phase_name: str) -> None:
        """Raises what a user can act on for an OpError `e`, else `e` itself."""
        explain_determinism(e, phase_name)
        # Reader errors cross tf.data as OpErrors; give back the DataError
        # (shard URL, offset, remedy) that caused one.
        input_pipeline.reraise_data_error(e)
