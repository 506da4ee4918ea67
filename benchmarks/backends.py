"""The digits job's two phases on TensorFlow and on JAX (runtime.backend): images/s.

One run: for each backend a fresh process (Keras picks its backend once per
process) builds the digits job's model (ResNet50 at 32x32, random weights,
batch 64) and runs each phase's training step as the loop does, through the
backend's engine (train.make_engine), fed by the input pipeline: `--warmup`
steps (compilation), then `--steps` timed steps. The TensorFlow phases use the
spec's `jit_compile = "auto"` rule (no XLA for the frozen phase on a CPU,
XLA for fine-tuning); JAX compiles both. The frozen phase trains on images
here on both backends (the TensorFlow loop would use cached features:
benchmarks/frozen_phase.py measures those).

    .venv/bin/python benchmarks/backends.py [--steps=10] [--warmup=2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's `trainer` and `benchmarks`, whatever is installed.
sys.path.insert(0, ROOT)


def measure_backend(backend: str, steps: int, warmup: int, data: str) -> dict:
    """images/s per phase on `backend`, in this process."""
    from trainer import backend as backend_lib

    backend_lib.select(backend)
    from trainer import config, models, step_math, train

    spec = config.load(
        os.path.join(ROOT, "jobs", "digits.toml"),
        [
            f"data.train={data}/train-*.tfrecord",
            f"data.validation={data}/validation-*.tfrecord",
            f"runtime.backend={backend}",
        ],
    )
    spec = train.input_pipeline.with_class_names(spec)
    batch = spec.train.global_batch_size
    out = {}
    with train.setup_runtime(spec, backend) as rt:
        engine = train.make_engine(rt)
        with engine.scope():
            model = models.build_model(spec)
        for phase in spec.phases:
            train.set_trainable(model, spec, phase)
            jit = True if backend == "jax" else train.resolve_jit(spec, phase, rt)
            with engine.scope():
                optimizer = step_math.make_optimizer(
                    spec.train.optimizer, phase.learning_rate, rt.precision
                )
                optimizer.build(model.trainable_variables)
            train_fn = engine.make_train_step(
                model,
                optimizer,
                num_classes=spec.data.num_classes,
                global_batch=batch,
                jit=jit,
            )
            batches = engine.train_batches(
                spec,
                epoch=0,
                start_step=0,
                batches=warmup + steps,
                tally=None,
                features=None,
            )
            engine.run_steps(train_fn, batches, warmup, 0, short_ok=False)
            start = time.perf_counter()
            engine.run_steps(train_fn, batches, steps, 0, short_ok=False)
            seconds = time.perf_counter() - start
            out[phase.name] = {
                "images_per_s": round(steps * batch / seconds, 1),
                "jit": jit,
                "devices": f"{rt.strategy_name} x{rt.num_replicas}",
            }
    return out


def input_half() -> dict | None:
    """The TF-free input path's own figures, where benchmarks/tf_free_input.py
    exists (another change adds it)."""
    # --- merge point: the TF-free input benchmark (benchmarks/tf_free_input.py)
    try:
        from benchmarks import tf_free_input
    except ImportError:
        return None
    return tf_free_input.measure()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # The child process.
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        result = measure_backend(args.backend, args.steps, args.warmup, args.data)
        print("RESULT " + json.dumps(result))
        return
    from trainer import convert

    with tempfile.TemporaryDirectory() as data:
        convert.convert_sample_digits(data, shards=7)
        results = {b: _child(b, args, data) for b in ("tensorflow", "jax")}
    print(f"\ndigits job, ResNet50 32x32, batch 64, {args.steps} timed steps")
    print(f"{'backend':<11} {'phase':<9} {'images/s':>9}  compiled  devices")
    for backend, phases in results.items():
        for phase, r in phases.items():
            print(
                f"{backend:<11} {phase:<9} {r['images_per_s']:>9.1f}  "
                f"{str(r['jit']):<8}  {r['devices']}"
            )
    extra = input_half()
    if extra is not None:
        print("\nTF-free input:", json.dumps(extra))


def _child(backend: str, args, data: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BACKEND", None)
    command = [sys.executable, os.path.abspath(__file__), f"--backend={backend}"]
    done = subprocess.run(
        [
            *command,
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--data={data}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"{backend} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


if __name__ == "__main__":
    main()
