"""The JAX backend's steps: Keras' stateless API under `jax.jit`, data parallel
over a device mesh (parameters replicated, each batch split along "batch")."""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator

from trainer import backend

# Where TensorFlow is installed, the data still comes through tf.data.
tf = backend.import_tensorflow_or_none()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from trainer import step_math  # noqa: E402


class _NoError(Exception):
    """Never raised: the "op errors" of a process without TensorFlow."""


# ---------------------------------------------------------------------------
# Input: this process's numpy slice of every global batch


def train_batches(
    spec, *, epoch: int, start_step: int, worker: int, workers: int, tally
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images uint8 [G/workers, S, S, 3], labels int32) of the epoch from
    `start_step` on: worker `worker`'s slice of each global batch G, the
    records the TensorFlow backend's worker reads."""
    if tf is None:  # The TF-free input: the same arrays without TensorFlow.
        from trainer import np_input

        return np_input.train_batches(
            spec,
            epoch=epoch,
            start_step=start_step,
            worker=worker,
            workers=workers,
            tally=tally,
        )
    from trainer import input_pipeline

    ds = input_pipeline.train_dataset(
        spec,
        epoch=epoch,
        start_step=start_step,
        input_context=_context(worker, workers),
        tally=tally,
    )
    return ds.as_numpy_iterator()


def eval_batches(
    spec, *, worker: int, workers: int, tally, pass_key: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, weights) of the validation split, worker `worker`'s
    slice of each global eval batch; the same number of batches on every
    worker, the last ones padded with weight 0.0."""
    if tf is None:
        from trainer import np_input

        return np_input.eval_batches(
            spec, worker=worker, workers=workers, tally=tally, pass_key=pass_key
        )
    from trainer import input_pipeline

    ds = input_pipeline.eval_dataset(
        spec, input_context=_context(worker, workers), tally=tally, pass_key=pass_key
    )
    return ds.as_numpy_iterator()


def _context(worker: int, workers: int):
    """One input pipeline per process, its batch the process's share."""
    return tf.distribute.InputContext(
        num_input_pipelines=workers,
        input_pipeline_id=worker,
        num_replicas_in_sync=workers,
    )


# ---------------------------------------------------------------------------
# The steps


def per_example(num_classes: int, labels, outputs):
    """Per-example loss, correctness and class in float32 (steps.per_example's
    formulas, in JAX)."""
    outputs = outputs.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    if num_classes == 1:
        y = labels.reshape(-1, 1).astype(jnp.float32)
        loss = keras.losses.binary_crossentropy(y, outputs)
        pred = (outputs.reshape(-1) > 0.5).astype(jnp.int32)
    else:
        loss = keras.losses.sparse_categorical_crossentropy(labels, outputs)
        pred = jnp.argmax(outputs, axis=-1).astype(jnp.int32)
    return loss, (pred == labels).astype(jnp.float32), pred


def train_step_fn(model, optimizer, *, num_classes: int, global_batch: int):
    """`step(state, images, labels, flags) -> (state, sums)`, to jit.

    `state` is (trainable, non-trainable, optimizer variables) as arrays, in
    the order of the Keras lists. The batch is the global one: the sums over
    it are the all-reduce of the TensorFlow step, and the loss, summed over
    the global batch / its size, is the same mean.
    """

    def loss_fn(trainable, non_trainable, images, labels):
        outputs, non_trainable = model.stateless_call(
            trainable, non_trainable, images.astype(jnp.float32), training=True
        )
        loss, correct, _ = per_example(num_classes, labels, outputs)
        return jnp.sum(loss) / global_batch, (non_trainable, loss, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, images, labels, flags):
        trainable, non_trainable, opt_vars = state
        (_, (non_trainable, loss, correct)), grads = grad_fn(
            trainable, non_trainable, images, labels
        )
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        count = jnp.float32(labels.shape[0])
        sums = jnp.stack([jnp.sum(loss), jnp.sum(correct), count, jnp.sum(flags)])
        return (trainable, non_trainable, opt_vars), sums

    return step


def eval_step_fn(model, *, num_classes: int):
    """`eval(trainable, non_trainable, images, labels, weights)` -> weighted sums
    and the confusion matrix (rows: labels, columns: predictions)."""
    size = max(num_classes, 2)

    def eval_step(trainable, non_trainable, images, labels, weights):
        outputs, _ = model.stateless_call(
            trainable, non_trainable, images.astype(jnp.float32), training=False
        )
        loss, correct, pred = per_example(num_classes, labels, outputs)
        confusion = jax.nn.one_hot(labels, size).T @ (
            jax.nn.one_hot(pred, size) * weights[:, None]
        )
        return {
            "loss": jnp.sum(loss * weights),
            "correct": jnp.sum(correct * weights),
            "count": jnp.sum(weights),
            "confusion": confusion,
        }

    return eval_step


# ---------------------------------------------------------------------------
# The engine: what train._Run drives (steps.Engine is the TensorFlow one)


class Engine:
    """The JAX backend: one jitted step per phase on arrays this engine holds.

    The Keras variables are read into replicated arrays when a phase's step is
    made, and written back by `sync()`, which the loop calls before every
    checkpoint: everything that reads the variables (checkpoints, the export)
    sees what the TensorFlow backend's variables would hold.
    """

    name = "jax"
    # The data's reader errors, where the data comes through tf.data.
    op_error = _NoError if tf is None else tf.errors.OpError
    lost_peer_errors: tuple[type[Exception], ...] = ()

    def __init__(self, rt):
        self.rt = rt
        mesh = rt.strategy
        self._split = NamedSharding(mesh, PartitionSpec("batch"))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._local_devices = len(mesh.local_devices)
        self._model = self._optimizer = self._state = None

    def scope(self):
        return contextlib.nullcontext()

    def make_train_step(
        self, model, optimizer, *, num_classes, global_batch, jit, forward=None
    ):
        """The phase's jitted step; reads the phase's state from the variables.

        Every phase compiles (`jit` is TensorFlow's choice): on JAX an
        uncompiled step would run op by op.
        """
        if forward is not None:
            raise ValueError("the JAX backend trains on images, not cached features")
        self._model, self._optimizer = model, optimizer
        self._state = tuple(
            [self._replicate(v) for v in variables]
            for variables in (
                model.trainable_variables,
                model.non_trainable_variables,
                optimizer.variables,
            )
        )
        step = train_step_fn(
            model, optimizer, num_classes=num_classes, global_batch=global_batch
        )
        # The state's buffers are reused for its next value (half the memory).
        return jax.jit(step, donate_argnums=0)

    def make_eval_step(self, model, *, num_classes, forward=None):
        return jax.jit(eval_step_fn(model, num_classes=num_classes))

    def train_batches(self, spec, *, epoch, start_step, batches, tally, features):
        """`batches` batches of this process's slice of the epoch."""
        rt = self.rt
        worker = jax.process_index() if rt.workers > 1 else 0
        return itertools.islice(
            train_batches(
                spec,
                epoch=epoch,
                start_step=start_step,
                worker=worker,
                workers=rt.workers,
                tally=tally,
            ),
            batches,
        )

    def run_steps(self, train_fn, iterator, n: int, flag: int, *, short_ok: bool):
        """`n` steps' sums; None when the data ran out first and `short_ok`."""
        flags = self._global(np.full(self._local_devices, flag, np.float32))
        totals = None
        for _ in range(n):
            batch = next(iterator, None)
            if batch is None:
                if short_ok:
                    return None
                raise RuntimeError("the training data ended before the epoch did")
            images, labels = (self._global(x) for x in batch)
            self._state, sums = train_fn(self._state, images, labels, flags)
            totals = sums if totals is None else totals + sums
        values = _host(totals)
        names = ("loss", "correct", "count", "stop")
        return dict(zip(names, map(float, values), strict=True))

    def evaluate(self, eval_fn, spec, tally, pass_key, features) -> dict[str, Any]:
        """`val_loss`, `val_accuracy` and the confusion matrix, with the
        weights the phase has now."""
        trainable, non_trainable, _ = self._state
        rt, total = self.rt, {}
        batches = eval_batches(
            spec,
            worker=jax.process_index() if rt.workers > 1 else 0,
            workers=rt.workers,
            tally=tally,
            pass_key=pass_key,
        )
        for batch in batches:
            arrays = [self._global(x) for x in batch]
            step_math.accumulate(total, eval_fn(trainable, non_trainable, *arrays))
        total = {k: _host(v) for k, v in total.items()}
        return step_math.eval_metrics(total)

    def sync(self) -> None:
        """Writes the phase's state into the Keras model and optimizer."""
        if self._state is None:
            return
        model, optimizer = self._model, self._optimizer
        lists = (
            model.trainable_variables,
            model.non_trainable_variables,
            optimizer.variables,
        )
        for variables, values in zip(lists, self._state, strict=True):
            for variable, value in zip(variables, values, strict=True):
                # A host copy: the next step reuses (donates) the state's buffers.
                variable.assign(_host(value))

    def explain(self, e: Exception, phase_name: str) -> None:
        """Raises the DataError behind a tf.data error `e`, else `e` itself."""
        from trainer import input_pipeline

        input_pipeline.reraise_data_error(e)

    def _replicate(self, variable) -> jax.Array:
        """A variable's value on every device of the mesh (fresh buffers)."""
        host = np.asarray(keras.ops.convert_to_numpy(variable))
        return jax.make_array_from_callback(
            host.shape, self._replicated, lambda index: host[index]
        )

    def _global(self, local: np.ndarray) -> jax.Array:
        """This process's slice of a batch as the global array, split over
        the mesh along its first axis."""
        return jax.make_array_from_process_local_data(self._split, local)


def _host(value) -> np.ndarray:
    """A replicated array's value on this host (its first local copy)."""
    return np.asarray(value.addressable_data(0))
