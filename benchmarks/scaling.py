"""One process vs two logical CPU replicas vs two worker processes (issue 10).

Part 1, the whole loop: the digits job (MobileNetV2, 32x32, global batch 32)
as `trainer train` in each of the three set-ups, interleaved, `--repeats`
times; per phase the images/s from Keras' progress line (median and spread),
and the CPU seconds each set-up used (all its processes).

Part 2, the agreed-preemption check: in two real worker processes
(MultiWorkerMirroredStrategy on 127.0.0.1), blocks of fine-tune steps compiled
with the stop-flag all-reduce (`agree=True`, what several workers run) and
without it, interleaved; the difference as a share of a step.
Target: <= 2% of the fine-tune step.

    .venv/bin/python benchmarks/scaling.py [--repeats=3] [--blocks=7]
    .venv/bin/python benchmarks/scaling.py --agreement_only --blocks=41
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = [
    "model.backbone=mobilenetv2",
    "model.dense=[32]",
    "phases.finetune.trainable_from=block_16_expand",
    "train.global_batch_size=32",
    "train.checkpoint_every_steps=1000",
    "phases.transfer.epochs=1",
    "phases.transfer.steps_per_epoch=30",
    "phases.finetune.epochs=1",
    "phases.finetune.steps_per_epoch=30",
]
BATCH = 32


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _envs(setup: str) -> list[dict[str, str]]:
    if setup == "one process":
        return [{}]
    if setup == "2 logical CPUs":
        return [{"TRAINER_CPU_DEVICES": "2"}]
    hosts = [f"127.0.0.1:{p}" for p in _ports(2)]
    return [
        {
            "TF_CONFIG": json.dumps(
                {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
            )
        }
        for i in range(2)
    ]


def run_setup(setup: str, data: str, scratch: str) -> tuple[dict[str, float], float]:
    """Images/s per phase (from worker 0) and the CPU seconds of all processes."""
    workdir = tempfile.mkdtemp(dir=scratch)
    args = [
        sys.executable, "-m", "trainer", "train", "--job=jobs/digits.toml",
        f"--workdir={workdir}", f"--set=data.train={data}/train-*.tfrecord",
        f"--set=data.validation={data}/validation-*.tfrecord",
        *(f"--set={s}" for s in SETTINGS),
    ]  # fmt: skip
    if setup == "2 logical CPUs":
        args.append("--set=runtime.strategy=mirrored")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    procs = [
        subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for env in _envs(setup)
    ]  # fmt: skip
    outputs = [p.communicate()[0] for p in procs]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode:
            raise SystemExit(f"{setup}: exit {p.returncode}\n{out[-3000:]}")
    rates, phase = {}, None
    for line in outputs[0].splitlines():
        m = re.match(r"(transfer|finetune) epoch", line)
        phase = m.group(1) if m else phase
        m = re.search(r" - (\d+)ms/step", line)
        if m and phase:
            rates[phase] = BATCH * 1000 / int(m.group(1))
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return rates, cpu


def agreement_worker(index: int, hosts: list[str], data: str, blocks: int) -> None:
    """Part 2 in one worker: interleaved blocks of steps and of agreements."""
    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
    )
    from trainer import config, input_pipeline, models, runtime, steps, train

    spec = config.load(os.path.join(ROOT, "jobs", "digits.toml"), [
        f"data.train={data}/train-*.tfrecord", f"data.validation={data}/validation-*.tfrecord",
        *SETTINGS, "runtime.strategy=multiworker",
    ])  # fmt: skip
    with runtime.setup(spec.runtime) as rt:
        with rt.strategy.scope():
            model = models.build_model(spec)
            train.set_trainable(model, spec, spec.phases[1])
            optimizer = steps.make_optimizer("adam", 1e-4, rt.precision)
            optimizer.build(model.trainable_variables)
        variants = {
            name: steps.make_train_step(
                model, optimizer, rt.strategy, num_classes=10, global_batch=BATCH,
                jit=False, agree=name == "agree",
            )
            for name in ("plain", "agree")
        }  # fmt: skip
        data_iter = iter(rt.strategy.distribute_datasets_from_function(
            lambda ctx: input_pipeline.train_dataset(spec, epoch=0, input_context=ctx).repeat()
        ))  # fmt: skip
        tf = sys.modules["tensorflow"]
        one, flag = tf.constant(1), tf.constant(0, tf.int32)
        for fn in variants.values():  # Traced and warm.
            float(fn(data_iter, one, flag)["loss"])
        # "agree" carries the flag in the step's own all-reduce, as the loop
        # runs it; "plain" leaves it out.
        timings = {name: [] for name in variants}
        for _ in range(blocks):
            for name, fn in variants.items():
                start = time.perf_counter()
                for _ in range(10):
                    out = fn(data_iter, one, flag)
                    if name == "agree" and float(out["stop"]) > 0:
                        raise SystemExit("no worker was told to stop")
                    float(out["loss"])
                timings[name].append((time.perf_counter() - start) / 10)
    if index == 0:
        print("TIMINGS " + json.dumps(timings))


def agreement_share(data: str, blocks: int) -> dict[str, float]:
    hosts = [f"127.0.0.1:{p}" for p in _ports(2)]
    procs = [
        subprocess.Popen([sys.executable, __file__, f"--worker={i}", f"--hosts={','.join(hosts)}",
                          f"--data={data}", f"--blocks={blocks}"], cwd=ROOT,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]  # fmt: skip
    out = [p.communicate()[0] for p in procs][0]
    line = next((ln for ln in out.splitlines() if ln.startswith("TIMINGS ")), None)
    if line is None:
        raise SystemExit(out[-3000:])
    t = json.loads(line[len("TIMINGS ") :])
    shares = [a / p - 1 for a, p in zip(t["agree"], t["plain"], strict=True)]
    return {
        "step_ms": 1000 * statistics.median(t["plain"]),
        "agree_ms": 1000 * statistics.median(t["agree"]),
        "share": statistics.median(shares),
        "share_min": min(shares),
        "share_max": max(shares),
        # The middle half of the blocks: what the median's noise looks like.
        "share_q1": statistics.quantiles(shares, n=4)[0],
        "share_q3": statistics.quantiles(shares, n=4)[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--worker", type=int)
    parser.add_argument("--hosts")
    parser.add_argument("--data")
    parser.add_argument("--agreement_only", action="store_true", help="part 2 only")
    a = parser.parse_args()
    if a.worker is not None:
        return agreement_worker(a.worker, a.hosts.split(","), a.data, a.blocks)
    scratch = tempfile.mkdtemp(prefix="scaling-")
    data = os.path.join(scratch, "digits")
    subprocess.run([sys.executable, "-m", "trainer", "convert", "--sample=digits", f"--out={data}",
                    "--shards=4"], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    if not a.agreement_only:
        whole_loop(data, scratch, a.repeats)
    share = agreement_share(data, a.blocks)
    print(
        f"fine-tune step, 2 workers, median of {a.blocks} interleaved blocks of 10: "
        f"{share['step_ms']:.1f} ms without the stop-flag all-reduce, "
        f"{share['agree_ms']:.1f} ms with it: {100 * share['share']:+.2f}% "
        f"[{100 * share['share_min']:+.2f} to {100 * share['share_max']:+.2f}%; "
        f"middle half {100 * share['share_q1']:+.2f} to {100 * share['share_q3']:+.2f}%] "
        "(target <= 2%)"
    )


def whole_loop(data: str, scratch: str, repeats: int) -> None:
    """Part 1: the three set-ups' images/s per phase and CPU seconds."""
    setups = ["one process", "2 logical CPUs", "2 worker processes"]
    results = {s: {"transfer": [], "finetune": [], "cpu": []} for s in setups}
    for r in range(repeats):
        for setup in setups[r % 3 :] + setups[: r % 3]:  # Interleaved, rotated.
            rates, cpu = run_setup(setup, data, scratch)
            for phase in ("transfer", "finetune"):
                results[setup][phase].append(rates[phase])
            results[setup]["cpu"].append(cpu)
    print(
        f"images/s, median [min-max] of {repeats} interleaved runs (global batch {BATCH}):"
    )
    print(f"{'set-up':<20}{'transfer':>24}{'finetune':>24}{'CPU s/run':>12}")
    for setup in setups:
        cells = [
            f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"
            for v in (results[setup]["transfer"], results[setup]["finetune"])
        ]
        print(
            f"{setup:<20}{cells[0]:>24}{cells[1]:>24}{statistics.median(results[setup]['cpu']):>12.0f}"
        )


if __name__ == "__main__":
    main()
