"""Command line: `trainer COMMAND [flags]`; the only module that reads absl FLAGS.

Kept thin on purpose (flax's main.py): everything it calls is a library
function that a notebook can call too, e.g. `train.run(spec, workdir)`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from trainer.errors import TrainerError, UsageError

COMMANDS = ("train", "check", "layers", "convert", "evaluate", "predict", "submit")
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "job", None, "Job spec: path or URL of a TOML file (jobs/digits.toml)."
)
flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: local path or fsspec URL (gs://...). Its identity: re-running resumes.",
)
flags.DEFINE_multi_string(
    "set", [], "Override a spec key: --set=train.seed=1 --set=phases.finetune.epochs=1."
)
flags.DEFINE_string(
    "deadline",
    None,
    "Stop with a checkpoint (exit 75) before this much time has passed, e.g. 11h30m.",
)
flags.DEFINE_string("backbone", "resnet50", "`layers`: the backbone to list.")
flags.DEFINE_integer(
    "image_size", 224, "`layers`: input size to build the backbone at."
)
flags.DEFINE_string(
    "images", None, "`convert`: a folder with one subfolder of images per class."
)
flags.DEFINE_string("sample", None, "`convert`: a bundled sample data set (digits).")
flags.DEFINE_string("out", None, "`convert`: output URL for the TFRecord shards.")
flags.DEFINE_integer(
    "shards",
    None,
    "`convert`: number of shards per split (default: by size, ~100 MB each).",
)
flags.DEFINE_float(
    "validation_fraction", 0.2, "`convert`: fraction held out as validation."
)
flags.DEFINE_string(
    "data", None, "`evaluate`: TFRecord URL glob (default: the job's validation data)."
)
flags.DEFINE_string(
    "target", None, "`submit`: where to run the job: vertex | gce | kaggle | colab."
)
flags.DEFINE_bool(
    "dry_run",
    False,
    "`submit`: write and print the artifacts and the command; upload and run nothing.",
)
flags.DEFINE_string(
    "out_dir",
    None,
    "`submit`: folder for the rendered artifacts (default: a new temp folder).",
)
flags.DEFINE_string(
    "package",
    None,
    "`submit` (gce, kaggle, colab): pip requirement of trainer, e.g. 'trainer @ git+https://github.com/OWNER/REPO@main' (default: $TRAINER_PACKAGE).",
)
flags.DEFINE_string(
    "region", None, "`submit --target=vertex`: Vertex AI region (default us-central1)."
)
flags.DEFINE_string(
    "image_uri",
    None,
    "`submit --target=vertex`: the container image built from deploy/docker/Dockerfile.",
)
flags.DEFINE_string(
    "machine_type",
    None,
    "`submit` (vertex, gce): machine type (default n1-standard-8 / e2-standard-8; with a GPU, the series it attaches to).",
)
flags.DEFINE_string(
    "accelerator_type",
    None,
    "`submit`: GPU type; vertex NVIDIA_TESLA_T4, gce nvidia-tesla-t4, ...",
)
flags.DEFINE_integer(
    "accelerator_count",
    None,
    "`submit` (vertex, gce): GPUs per machine (default 1 with --accelerator_type).",
)
flags.DEFINE_string(
    "timeout",
    None,
    "`submit --target=vertex`: maximum running time, e.g. 24h (Vertex's default: 7 days).",
)
flags.DEFINE_string(
    "max_wait",
    None,
    "`submit --target=vertex`: maximum time to wait for resources, e.g. 2h.",
)
flags.DEFINE_string(
    "service_account",
    None,
    "`submit` (vertex, gce): service account the job runs as.",
)
flags.DEFINE_string(
    "zone", None, "`submit --target=gce`: zone of the spot VM (default us-central1-a)."
)
flags.DEFINE_string(
    "vm_name",
    None,
    "`submit --target=gce`: name of the managed instance group and its VM (default: the job name).",
)
flags.DEFINE_string(
    "image_family",
    None,
    "`submit --target=gce`: boot image family (default debian-12: Python 3.11).",
)
flags.DEFINE_string(
    "image_project",
    None,
    "`submit --target=gce`: boot image project (default debian-cloud).",
)
flags.DEFINE_string(
    "boot_disk_size", None, "`submit --target=gce`: boot disk size (default 50GB)."
)
flags.DEFINE_string(
    "on_done",
    None,
    "`submit --target=gce`: delete | stop, what the VM does once the run completed (default delete).",
)
flags.DEFINE_string(
    "kernel_id",
    None,
    "`submit --target=kaggle`: OWNER/SLUG (default: $KAGGLE_USERNAME/<job name>).",
)
flags.DEFINE_string(
    "accelerator",
    None,
    "`submit` (kaggle, colab): the session's accelerator: none | gpu | tpu (default none).",
)
flags.DEFINE_multi_string(
    "dataset_sources",
    None,
    "`submit --target=kaggle`: a Kaggle dataset to attach, OWNER/SLUG (repeatable).",
)
flags.DEFINE_string(
    "machine_shape",
    None,
    "`submit --target=kaggle`: NvidiaTeslaT4 (GPU T4 x2) | TpuV5E8 (TPU v5e-8); default from --accelerator.",
)
flags.DEFINE_bool(
    "internet",
    None,
    "`submit --target=kaggle`: --nointernet for internet-off (competition) sessions.",
)
flags.DEFINE_string(
    "resume_from",
    None,
    "`submit --target=kaggle`: notebook whose output holds a /kaggle/working workdir: auto | none | OWNER/SLUG.",
)
flags.DEFINE_string(
    "give_up_after",
    None,
    "`submit --target=gce`: stop reviving a preempted run this long after submitting (default 168h, 7 days).",
)
flags.DEFINE_string(
    "gcs_secret",
    None,
    "`submit --target=kaggle`: Kaggle secret holding a service-account JSON key, for a gs:// workdir.",
)


def _usage() -> str:
    return (
        "usage: trainer COMMAND [flags]\n"
        "  train    --job=JOB.toml --workdir=URL [--set=KEY=VALUE ...] [--deadline=11h30m]\n"
        "  check    --job=JOB.toml --workdir=URL [--set=...]   (CPU dry run, writes nothing)\n"
        "  layers   --backbone=NAME\n"
        "  convert  (--images=DIR | --sample=digits) --out=URL [--shards=N] [--validation_fraction=F]\n"
        "  evaluate --workdir=URL [--data=GLOB]\n"
        "  predict  --workdir=URL FILE_OR_URL ...\n"
        "  submit   --target=vertex|gce|kaggle|colab --job=JOB.toml --workdir=gs://... [--dry_run]\n"
        "run `trainer --helpfull` for every flag"
    )


def _require(name: str) -> str:
    value = getattr(FLAGS, name)
    if not value:
        raise UsageError(f"--{name} is required for this command\n{_usage()}")
    return value


def _workdir() -> str:
    """--workdir, or on Vertex AI the parent of AIP_CHECKPOINT_DIR / AIP_MODEL_DIR."""
    if FLAGS.workdir:
        return FLAGS.workdir
    for var in ("AIP_CHECKPOINT_DIR", "AIP_MODEL_DIR"):
        if os.environ.get(var):
            from trainer import storage

            return storage.dirname(os.environ[var].rstrip("/"))
    raise UsageError(
        f"--workdir is required (a local path or a URL such as gs://bucket/run)\n{_usage()}"
    )


def _spec():
    from trainer import config

    return config.load(_require("job"), FLAGS.set)


def main(argv: list[str]) -> int:
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        got = f"unknown command {args[0]!r}\n" if args else ""
        raise UsageError(got + _usage())
    command, rest = args[0], args[1:]
    if rest and command != "predict":
        raise UsageError(f"unexpected arguments {rest!r} for `{command}`\n{_usage()}")
    if command == "train":
        spec, workdir = _spec(), _workdir()
        from trainer import preemption, train

        deadline = preemption.parse_duration(FLAGS.deadline) if FLAGS.deadline else None

        train.run(spec, workdir, deadline_seconds=deadline)
    elif command == "check":
        spec, workdir = _spec(), _workdir()
        from trainer import check

        check.check(spec, workdir)
    elif command == "layers":
        from trainer import models

        print(
            models.format_layer_table(
                models.layer_table(FLAGS.backbone, FLAGS.image_size)
            )
        )
    elif command == "convert":
        from trainer import convert

        out = _require("out")
        if bool(FLAGS.images) == bool(FLAGS.sample):
            raise UsageError(
                "convert needs exactly one of --images=DIR or --sample=digits"
            )
        if FLAGS.sample:
            if FLAGS.sample != "digits":
                raise UsageError(
                    f"--sample: received {FLAGS.sample!r}; expected 'digits'"
                )
            info = convert.convert_sample_digits(
                out, shards=FLAGS.shards, validation_fraction=FLAGS.validation_fraction
            )
        else:
            info = convert.convert_images(
                FLAGS.images,
                out,
                shards=FLAGS.shards,
                validation_fraction=FLAGS.validation_fraction,
            )
        print(convert.describe(info, out))
    elif command == "evaluate":
        from trainer import evaluate

        evaluate.evaluate(_workdir(), data=FLAGS.data)
    elif command == "predict":
        from trainer import evaluate

        if not rest:
            raise UsageError("predict needs at least one image file or URL")
        evaluate.predict(_workdir(), rest)
    elif command == "submit":
        from trainer import submit

        options = {
            name: getattr(FLAGS, name)
            for name in submit.FLAG_OPTIONS
            if getattr(FLAGS, name) is not None
        }
        submit.submit(
            _require("target"),
            _require("job"),
            _require("workdir"),
            dry_run=FLAGS.dry_run,
            overrides=FLAGS.set,
            deadline=FLAGS.deadline or "",
            **options,
        )
    return 0


def _entry(argv: list[str]) -> None:
    """Runs `main` and maps its outcome to design.md's exit codes, by type.

    TrainerError (bad input, a state the user must fix): exit 2, one line.
    Preempted (signal, GCE notice or deadline, after a durable checkpoint): 75.
    Anything else is a bug: exit 1 with its traceback.
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
            raise
        print(
            f"stopped ({e}) after a durable checkpoint: run the same command "
            "again to resume",
            file=sys.stderr,
        )
        code = EXIT_PREEMPTED
    sys.stdout.flush()
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, but a bad flag exits 2 (bad input), not 1."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\n{_usage()}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def run_main() -> None:
    """Console-script entry point (`trainer`)."""
    logging.set_verbosity(logging.WARNING)
    app.run(_entry, flags_parser=_parse_flags)


if __name__ == "__main__":
    run_main()
