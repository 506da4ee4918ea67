"""Command line: `trainer COMMAND [flags]`; the only module that reads absl flags.

Kept thin on purpose (flax's main.py): everything it calls is a library
function that a notebook can call too, e.g. `train.run(spec, workdir)`. Each
command owns its flags (`FLAGS_OF`), defined into a new `flags.FlagValues` on
every call, so running the CLI twice in one process (tests, a notebook) starts
clean, and a flag of another command is refused by name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import textwrap
import threading

from absl import app, flags, logging

from trainer.errors import TrainerError, UsageError

EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75

# `trainer`'s usage: one line per command (and `trainer COMMAND --help`'s first).
USAGE = {
    "train": "--job=JOB.toml --workdir=URL [--set=KEY=VALUE ...] [--deadline=11h30m]",
    "check": "--job=JOB.toml --workdir=URL [--set=...]   (CPU dry run, writes nothing)",
    "layers": "--backbone=NAME",
    "convert": "(--images=DIR | --sample=digits) --out=URL [--shards=N] [--validation_fraction=F]",
    "evaluate": "--workdir=URL [--data=GLOB]",
    "predict": "--workdir=URL FILE_OR_URL ...",
    "export": "--workdir=URL [--step=N]   (model.keras + a TF Serving SavedModel)",
    "submit": "--target=vertex|gce|kaggle|colab --job=JOB.toml --workdir=gs://... [--dry_run]",
}
COMMANDS = tuple(USAGE)

# Each command's flags: (absl DEFINE_ kind, name, default, help).
# fmt: off
_JOB = ("string", "job", None, "Job spec: path or URL of a TOML file (jobs/digits.toml).")
_WORKDIR = ("string", "workdir", None,
            "Run directory: local path or fsspec URL (gs://...). Its identity: re-running resumes.")
_SET = ("multi_string", "set", [],
        "Override a spec key: --set=train.seed=1 --set=phases.finetune.epochs=1.")
_DEADLINE = ("string", "deadline", None,
             "Stop with a checkpoint (exit 75) before this much time has passed, e.g. 11h30m.")
FLAGS_OF = {
    "train": [_JOB, _WORKDIR, _SET, _DEADLINE],
    "check": [_JOB, _WORKDIR, _SET],
    "layers": [
        ("string", "backbone", "resnet50", "`layers`: the backbone to list."),
        ("integer", "image_size", 224, "`layers`: input size to build the backbone at."),
    ],
    "convert": [
        ("string", "images", None, "`convert`: a folder with one subfolder of images per class."),
        ("string", "sample", None, "`convert`: a bundled sample data set (digits)."),
        ("string", "out", None, "`convert`: output URL for the TFRecord shards."),
        ("integer", "shards", None,
         "`convert`: number of shards per split (default: by size, ~100 MB each)."),
        ("float", "validation_fraction", 0.2, "`convert`: fraction held out as validation."),
    ],
    "evaluate": [
        _WORKDIR,
        ("string", "data", None,
         "`evaluate`: TFRecord URL glob (default: the job's validation data)."),
    ],
    "predict": [_WORKDIR],
    "export": [
        _WORKDIR,
        ("integer", "step", None,
         "`export`: the checkpoint step to export (default: train.export's choice, the best step unless the spec says last)."),
    ],
    # Every `submit.FLAG_OPTIONS` name has a flag here (a test checks it);
    # those left unset keep `submit.Options`' defaults.
    "submit": [
        ("string", "target", None, "`submit`: where to run the job: vertex | gce | kaggle | colab."),
        _JOB, _WORKDIR, _SET, _DEADLINE,
        ("bool", "dry_run", False,
         "`submit`: write and print the artifacts and the command; upload and run nothing."),
        ("string", "out_dir", None,
         "`submit`: folder for the rendered artifacts (default: a new temp folder)."),
        ("string", "package", None,
         "`submit` (gce, kaggle, colab): pip requirement of trainer, e.g. 'trainer @ git+https://github.com/OWNER/REPO@main' (default: $TRAINER_PACKAGE)."),
        ("string", "region", None, "`submit --target=vertex`: Vertex AI region (default us-central1)."),
        ("string", "image_uri", None,
         "`submit --target=vertex`: the container image built from deploy/docker/Dockerfile."),
        ("string", "machine_type", None,
         "`submit` (vertex, gce): machine type (default n1-standard-8 / e2-standard-8; with a GPU, the series it attaches to)."),
        ("string", "accelerator_type", None,
         "`submit`: GPU type; vertex NVIDIA_TESLA_T4, gce nvidia-tesla-t4, ..."),
        ("integer", "accelerator_count", None,
         "`submit` (vertex, gce): GPUs per machine (default 1 with --accelerator_type)."),
        ("string", "timeout", None,
         "`submit --target=vertex`: maximum running time, e.g. 24h (Vertex's default: 7 days)."),
        ("string", "max_wait", None,
         "`submit --target=vertex`: maximum time to wait for resources, e.g. 2h."),
        ("string", "service_account", None,
         "`submit` (vertex, gce): service account the job runs as."),
        ("string", "zone", None, "`submit --target=gce`: zone of the spot VM (default us-central1-a)."),
        ("string", "vm_name", None,
         "`submit --target=gce`: name of the managed instance group and its VM (default: the job name)."),
        ("string", "image_family", None,
         "`submit --target=gce`: boot image family (default debian-12: Python 3.11)."),
        ("string", "image_project", None,
         "`submit --target=gce`: boot image project (default debian-cloud)."),
        ("string", "boot_disk_size", None, "`submit --target=gce`: boot disk size (default 50GB)."),
        ("string", "on_done", None,
         "`submit --target=gce`: delete | stop, what the VM does once the run completed (default delete)."),
        ("string", "give_up_after", None,
         "`submit --target=gce`: stop reviving a preempted run this long after submitting (default 168h, 7 days)."),
        ("string", "kernel_id", None,
         "`submit --target=kaggle`: OWNER/SLUG (default: $KAGGLE_USERNAME/<job name>)."),
        ("string", "accelerator", None,
         "`submit` (kaggle, colab): the session's accelerator: none | gpu | tpu (default none; tpu trains with Keras on JAX)."),
        ("multi_string", "dataset_sources", None,
         "`submit --target=kaggle`: a Kaggle dataset to attach, OWNER/SLUG (repeatable)."),
        ("string", "machine_shape", None,
         "`submit --target=kaggle`: NvidiaTeslaT4 (GPU T4 x2) | TpuV5E8 (TPU v5e-8) | TpuV6E8 (TPU v6e-8); default from --accelerator."),
        ("bool", "internet", None,
         "`submit --target=kaggle`: --nointernet for internet-off (competition) sessions."),
        ("string", "resume_from", None,
         "`submit --target=kaggle`: notebook whose output holds a /kaggle/working workdir: auto | none | OWNER/SLUG."),
        ("string", "gcs_secret", None,
         "`submit --target=kaggle`: Kaggle secret holding a service-account JSON key, for a gs:// workdir."),
    ],
}
# fmt: on


def command_flags(command: str) -> flags.FlagValues:
    """A new FlagValues holding `command`'s flags, and --help."""
    flag_values = flags.FlagValues()
    for kind, name, default, text in FLAGS_OF[command]:
        define = getattr(flags, f"DEFINE_{kind}")
        define(name, default, text, flag_values=flag_values)
    flags.DEFINE_bool(
        "help", False, "Show this command's flags.", flag_values=flag_values
    )
    return flag_values


def _usage() -> str:
    lines = [f"  {command:<8} {args}" for command, args in USAGE.items()]
    return "\n".join(
        [
            "usage: trainer COMMAND [flags]",
            *lines,
            "run `trainer --helpfull` for every flag",
        ]
    )


def command_help(command: str) -> str:
    """`trainer COMMAND --help`: the command's usage line, then its flags."""
    lines = [f"usage: trainer {command} {USAGE[command]}", "flags:"]
    for kind, name, default, text in FLAGS_OF[command]:
        flag = f"--[no]{name}" if kind == "bool" else f"--{name}"
        if kind.startswith("multi") and "repeatable" not in text:
            text += " (repeatable)"
        elif default not in (None, False, []):
            text += f" (default: {default})"
        line = f"  {flag}: {text}"
        lines.append(
            textwrap.fill(line, 88, subsequent_indent="      ", break_on_hyphens=False)
        )
    return "\n".join(lines)


def _require(flag_values: flags.FlagValues, name: str) -> str:
    value = flag_values[name].value
    if not value:
        raise UsageError(f"--{name} is required for this command\n{_usage()}")
    return value


def _workdir(flag_values: flags.FlagValues) -> str:
    """--workdir, or on Vertex AI the parent of AIP_CHECKPOINT_DIR / AIP_MODEL_DIR."""
    if flag_values.workdir:
        from trainer import errors, storage

        try:
            storage.check_url(flag_values.workdir)
        except errors.BadURL as e:
            raise UsageError(f"--workdir: {e}") from None
        return flag_values.workdir
    for var in ("AIP_CHECKPOINT_DIR", "AIP_MODEL_DIR"):
        if os.environ.get(var):
            from trainer import storage

            return storage.dirname(os.environ[var].rstrip("/"))
    raise UsageError(
        f"--workdir is required (a local path or a URL such as gs://bucket/run)\n{_usage()}"
    )


def _spec(flag_values: flags.FlagValues):
    from trainer import config

    return config.load(_require(flag_values, "job"), flag_values.set)


# ---------------------------------------------------------------------------
# The commands: each takes its parsed flags and its positional arguments.


def _train(flag_values: flags.FlagValues, args: list[str]) -> None:
    spec, workdir = _spec(flag_values), _workdir(flag_values)
    from trainer import backend, preemption

    deadline = flag_values.deadline
    deadline = preemption.parse_duration(deadline, "--deadline") if deadline else None
    with _sigterm_is_preemption(preemption):
        backend.select(spec.runtime.backend)  # Before Keras is imported.
        from trainer import train

        train.run(spec, workdir, deadline_seconds=deadline)


@contextlib.contextmanager
def _sigterm_is_preemption(preemption):
    """SIGTERM before the loop watches for it (imports, runtime setup, model,
    restore: a minute for a large backbone restored from GCS) stops the run as
    a preemption, exit 75, not as a killed process (143), which a spot VM's
    startup script would count as a failure. The loop's watcher takes over,
    and puts this back when it stops."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Signals reach the main thread only.
        return

    def stop(signum, frame):
        raise preemption.Preempted("SIGTERM before training began", durable=False)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check(flag_values: flags.FlagValues, args: list[str]) -> None:
    spec, workdir = _spec(flag_values), _workdir(flag_values)
    from trainer import backend

    backend.select(spec.runtime.backend)  # Before Keras is imported: it reads it once.
    from trainer import check

    check.check(spec, workdir)


def _layers(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import models

    try:
        models.get_backbone(flag_values.backbone)
    except TrainerError as e:  # It names the spec key; here it is the flag.
        raise UsageError(str(e).replace("model.backbone:", "--backbone:", 1)) from None
    table = models.layer_table(flag_values.backbone, flag_values.image_size)
    print(models.format_layer_table(table))


def _convert(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import convert

    out = _require(flag_values, "out")
    images, sample = flag_values.images, flag_values.sample
    if bool(images) == bool(sample):
        raise UsageError("convert needs exactly one of --images=DIR or --sample=digits")
    sharding = {
        "shards": flag_values.shards,
        "validation_fraction": flag_values.validation_fraction,
    }
    if sample:
        if sample != "digits":
            raise UsageError(f"--sample: received {sample!r}; expected 'digits'")
        info = convert.convert_sample_digits(out, **sharding)
    else:
        info = convert.convert_images(images, out, **sharding)
    print(convert.describe(info, out))


def _evaluate(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import evaluate

    evaluate.evaluate(_workdir(flag_values), data=flag_values.data)


def _predict(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import evaluate

    if not args:
        raise UsageError("predict needs at least one image file or URL")
    evaluate.predict(_workdir(flag_values), args)


def _export(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import export

    export.run_export(_workdir(flag_values), step=flag_values.step)


def _submit(flag_values: flags.FlagValues, args: list[str]) -> None:
    from trainer import submit

    options = {
        name: flag_values[name].value
        for name in submit.FLAG_OPTIONS
        if flag_values[name].value is not None
    }
    submit.submit(
        _require(flag_values, "target"),
        _require(flag_values, "job"),
        _require(flag_values, "workdir"),
        dry_run=flag_values.dry_run,
        overrides=flag_values.set,
        deadline=flag_values.deadline or "",
        **options,
    )


RUN = {
    "train": _train,
    "check": _check,
    "layers": _layers,
    "convert": _convert,
    "evaluate": _evaluate,
    "predict": _predict,
    "export": _export,
    "submit": _submit,
}


# ---------------------------------------------------------------------------
# Entry points


def main(argv: list[str]) -> int:
    """Runs `trainer COMMAND [flags]` (argv[0]: the program); returns 0 or raises.

    Raises:
      UsageError: no or an unknown command, a flag it does not take, a bad value.
      TrainerError, preemption.Preempted, ...: what the command raised.
    """
    args = argv[1:]
    if args and args[0] in ("--help", "-h", "--helpshort", "--helpfull"):
        full = [command_help(c) for c in COMMANDS] if args[0] == "--helpfull" else []
        print("\n\n".join([_usage(), *full]))
        return 0
    if not args or args[0] not in COMMANDS:
        got = f"unknown command {args[0]!r}\n" if args else ""
        raise UsageError(got + _usage())
    command = args[0]
    flag_values = command_flags(command)
    try:
        rest = flag_values([f"{argv[0]} {command}", *args[1:]])[1:]
    except flags.Error as e:  # Unknown flag, missing or bad value.
        raise UsageError(f"{e}\n{_usage()}") from None
    if flag_values.help:
        print(command_help(command))
        return 0
    if rest and command != "predict":
        raise UsageError(f"unexpected arguments {rest!r} for `{command}`\n{_usage()}")
    RUN[command](flag_values, rest)
    return 0


def run(argv: list[str]) -> int:
    """The exit code of the command line `argv`, run in this process.

    Maps `main`'s outcome to design.md's exit codes, by type:
    TrainerError (bad input, a state the user must fix): 2, one line on stderr.
    Preempted (signal, GCE notice or deadline, after a durable checkpoint): 75.
    Anything else is a bug: it propagates (the console script exits 1 with its
    traceback).
    """
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except Exception as e:
        preemption = sys.modules.get("trainer.preemption")
        if preemption is None or not isinstance(e, preemption.Preempted):
            _note_unreachable(e)
            raise
        after = " after a durable checkpoint" if e.durable else ""
        print(
            f"stopped ({e}){after}: run the same command again to resume",
            file=sys.stderr,
        )
        code = EXIT_PREEMPTED
    sys.stdout.flush()
    return code


def _note_unreachable(e: Exception) -> None:
    """Below the traceback of a store that could not be reached: what it was
    and what to do (the last line a user reads)."""
    storage = sys.modules.get("trainer.storage")
    cause = storage.unreachable(e) if storage else None
    if cause:
        e.add_note(
            f"error: the store could not be reached ({cause}); check the network, "
            "the URL's host and the credentials, then run the same command again "
            "(nothing committed is lost)"
        )


def _absl_defaults(argv: list[str]) -> list[str]:
    """absl's own flags (its logging's) at their defaults; commands parse theirs."""
    flags.FLAGS(argv[:1])
    return argv


def run_main() -> None:
    """Console-script entry point (`trainer`, `python -m trainer`): exits `run`'s code."""
    logging.set_verbosity(logging.WARNING)
    app.run(_run_and_exit, flags_parser=_absl_defaults)


def _run_and_exit(argv: list[str]) -> int:
    return _exit_without_teardown(run(argv))


def _exit_without_teardown(code: int) -> int:
    """Exits with `code` as Python's own exit would, minus its last stage.

    Once TensorFlow (or JAX) is imported, the interpreter's teardown of its
    modules and objects takes 1.4 s of CPU after the command is done, for
    nothing: the process is about to end. The stages of an exit that matter
    still run, in Python's order: non-daemon threads are joined (a background
    checkpoint upload finishes), atexit handlers run (logging, TensorBoard
    writers, fsspec, JAX), stdio is flushed. Then the process ends. Returns
    `code` (for a normal exit) where those stages cannot be called.
    """
    heavy = "tensorflow" in sys.modules or "jax" in sys.modules
    shutdown = getattr(threading, "_shutdown", None)  # CPython's exit uses both.
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if not heavy or shutdown is None or run_exitfuncs is None:
        return code
    shutdown()
    run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_main()
