"""Job spec: TOML -> frozen dataclasses, `--set` overrides, strict validation.

stdlib only, so it can be imported (and a spec checked) without TensorFlow.
Every problem in a spec is collected and reported in one `SpecError`, each line
naming the key, the value received, what was expected and, where one fits, a
did-you-mean, in the manner of ml_collections and Composer.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from typing import Any, Literal, Union

from trainer import errors

JitCompile = Union[bool, Literal["auto"]]


class SpecError(errors.SpecError):
    """A job spec (file, TOML or overrides) is invalid; `problems` lists each."""

    def __init__(self, problems: list[str], source: str = "job spec"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`[data]`: where the TFRecord shards are and what they hold."""

    train: str
    validation: str
    image_size: int
    num_classes: int
    label_offset: int = 0  # 1 for 1-based label sets such as ImageNet's.
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    class_names: tuple[str, ...] = ()
    augment: Literal["none", "flip", "crop", "flip_crop"] = "none"
    on_corrupt: Literal["error", "skip"] = "error"
    # Shards read concurrently; 0 picks a small multiple of the cores.
    read_parallelism: int = 0
    # Records in the shuffle window of the training stream (exactly resumable).
    shuffle_buffer: int = 10_000
    # Backbone features of frozen, unaugmented phases computed once and kept
    # under {workdir}/cache/ (feature_cache.py): "auto" when they fit the budget.
    cache_features: Union[bool, Literal["auto"]] = "auto"
    # Storage dtype: "auto" is the backbone's output dtype (lossless).
    cache_dtype: Literal["auto", "float16", "float32"] = "auto"
    # MiB of features (both splits, held in host memory) that "auto" accepts.
    cache_budget_mb: int = 4096


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """`[model]`: the pretrained backbone and the new head."""

    backbone: str = "resnet50"
    weights: str = "imagenet"  # "imagenet" | "none" | URL of a .h5 / .weights.h5
    weights_mirror: str = ""  # dir/bucket holding Keras' weight files (no internet)
    pooling: Literal["flatten", "avg"] = "flatten"
    dense: tuple[int, ...] = (512,)
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`[train]`: batch, seeds, checkpoint cadence and compilation."""

    global_batch_size: int = 64
    eval_batch_size: int = 0  # 0 = global_batch_size
    seed: int = 0
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    checkpoint_every_steps: int = 50
    keep_checkpoints: int = 3
    deterministic: bool = False
    jit_compile: JitCompile = "auto"
    steps_per_execution: int = 1
    # Best checkpoint / early stopping track this validation metric.
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    early_stopping_patience: int = 0  # epochs without improvement; 0 = off
    # Which weights the run exports on completion: the best checkpoint's (by
    # `monitor`, the step the final line reports) or the final step's.
    export: Literal["best", "last"] = "best"
    # Whether that export writes a TF Serving SavedModel besides model.keras
    # (seconds to minutes for a large backbone); `trainer export` always does.
    export_saved_model: bool = True
    preemption_budget_seconds: float = 25.0
    # GCE metadata endpoint polled for spot preemption; "" = off, "auto" = on GCE.
    preemption_metadata_url: str = "auto"


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One `[[phases]]` entry: train from `trainable_from` on for `epochs`."""

    name: str
    epochs: int
    learning_rate: float
    trainable_from: str = "none"  # "none" | "all" | a layer or stage name
    jit_compile: JitCompile | None = None  # None inherits train.jit_compile
    # Cap on steps per epoch (0 = the whole training split); for dry runs.
    steps_per_epoch: int = 0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """`[runtime]`: distribution strategy and numeric precision."""

    strategy: Literal["auto", "tpu", "multiworker", "mirrored", "one_device", "cpu"] = (
        "auto"
    )
    mixed_precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = (
        "auto"
    )
    # Several workers: a collective that waits this long for a silent peer
    # (a VM gone without closing its connections) fails instead of hanging;
    # so does a start waiting for a worker that never comes up.
    collective_timeout_seconds: float = 600.0
    # Which framework Keras runs on (trainer/backend.py): "auto" picks JAX where
    # TensorFlow cannot drive the hardware (a TPU without tensorflow-tpu, as on
    # Colab and Kaggle) or is not installed, TensorFlow otherwise.
    backend: Literal["auto", "tensorflow", "jax"] = "auto"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A whole job spec: what to train."""

    name: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    phases: tuple[PhaseConfig, ...] = ()
    runtime: RuntimeConfig = RuntimeConfig()

    def phase_jit(self, phase: PhaseConfig) -> JitCompile:
        """The phase's `jit_compile`, inherited from `[train]` when unset."""
        return (
            self.train.jit_compile if phase.jit_compile is None else phase.jit_compile
        )

    def class_names(self) -> list[str]:
        """Display names of the classes: data.class_names, else "0", "1", ..."""
        if self.data.class_names:
            return list(self.data.class_names)
        return [str(i) for i in range(max(self.data.num_classes, 2))]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def shape_fingerprint(self) -> dict[str, Any]:
        """The fields a checkpoint's tensors depend on (resume refuses changes)."""
        d, m = self.data, self.model
        return {
            "model.backbone": m.backbone,
            "model.pooling": m.pooling,
            "model.dense": list(m.dense),
            "data.image_size": d.image_size,
            "data.num_classes": d.num_classes,
            "phases.names": [p.name for p in self.phases],
        }

    def shape_hash(self) -> str:
        blob = json.dumps(self.shape_fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "runtime": RuntimeConfig,
}


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
# Loading


def load(path_or_text: str, overrides: typing.Sequence[str] = (), *, is_text=False):
    """Parses a TOML job spec (a path, or the text itself) and applies overrides.

    Args:
      path_or_text: a local path or fsspec URL of a TOML file, or TOML text when
        `is_text` is true.
      overrides: `KEY=VALUE` strings; dotted keys, phases addressed by name
        (`phases.finetune.epochs=1`); values typed by the target field.
      is_text: treat `path_or_text` as the TOML text.

    Returns:
      A validated `JobSpec`.

    Raises:
      FileNotFoundError: the file does not exist.
      SpecError: listing every problem found.
    """
    source = "job spec" if is_text else path_or_text
    if is_text:
        text = path_or_text
    else:
        text = _read_text(path_or_text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError([f"not valid TOML: {e}"], source) from None
    problems: list[str] = []
    raw = apply_overrides(raw, overrides, problems)
    spec = from_dict(raw, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


def _read_text(path: str) -> str:
    if "://" in path:
        import fsspec  # Lazily: config stays importable with the stdlib only.

        try:
            with fsspec.open(path, "rt") as f:
                return f.read()
        except FileNotFoundError:
            raise errors.NotFound(f"job spec not found: {path}") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise errors.NotFound(
            f"job spec not found: {path} (pass --job=PATH to a TOML file, "
            "e.g. jobs/digits.toml)"
        ) from None
    except IsADirectoryError:
        raise errors.NotFound(
            f"job spec {path} is a directory, not a TOML file"
        ) from None


def from_dict(raw: dict[str, Any], problems: list[str] | None = None) -> JobSpec:
    """Builds a `JobSpec` from plain data (parsed TOML or job.json)."""
    collect = problems if problems is not None else []
    top_keys = {"name", "phases", *_SECTIONS}
    for key in raw:
        if key not in top_keys:
            collect.append(_unknown(key, key, top_keys))
    name = raw.get("name")
    if name is None:
        collect.append("name: missing (expected a string naming the job)")
        name = "job"
    elif not isinstance(name, str) or not name.strip():
        collect.append(f"name: received {name!r}; expected a non-empty string")
        name = "job"
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        value = raw.get(section, {})
        if not isinstance(value, dict):
            collect.append(
                f"{section}: received {value!r}; expected a table [{section}]"
            )
            value = {}
        if section == "data" and "data" not in raw:
            collect.append(
                "data: missing table [data] (train, validation, image_size, num_classes)"
            )
        sections[section] = _build(cls, value, section, collect)
    phases = _build_phases(raw.get("phases"), collect)
    # A section that failed to build is replaced by a valid placeholder, so the
    # range checks of the others still run and every problem is reported at once.
    placeholders = {
        "data": DataConfig(train="-", validation="-", image_size=1, num_classes=1),
        "model": ModelConfig(),
        "train": TrainConfig(),
        "runtime": RuntimeConfig(),
    }
    incomplete = any(v is None for v in sections.values())
    spec = JobSpec(
        name=name,
        phases=tuple(phases),
        **{k: v if v is not None else placeholders[k] for k, v in sections.items()},
    )
    _validate(spec, collect)
    if problems is None and collect:
        raise SpecError(collect)
    return None if incomplete else spec  # type: ignore[return-value]


def _build_phases(phases_raw: Any, collect: list[str]) -> list[PhaseConfig]:
    """The `[[phases]]` tables, each checked; problems go to `collect`."""
    phases: list[PhaseConfig] = []
    if phases_raw is None or phases_raw == []:
        collect.append(
            "phases: empty; expected at least one [[phases]] table "
            "(name, epochs, learning_rate, trainable_from)"
        )
        return phases
    if not isinstance(phases_raw, list):
        collect.append(f"phases: received {phases_raw!r}; expected [[phases]] tables")
        return phases
    for i, p in enumerate(phases_raw):
        label = f"phases[{i}]"
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            label = f"phases.{p['name']}"
        if not isinstance(p, dict):
            collect.append(f"{label}: received {p!r}; expected a table")
            continue
        phase = _build(PhaseConfig, p, label, collect)
        if phase is not None:
            phases.append(phase)
    names = [p.name for p in phases]
    for n in sorted({n for n in names if names.count(n) > 1}):
        collect.append(f"phases: name {n!r} used twice; phase names must be unique")
    return phases


def _unknown(path: str, key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}: unknown key{hint} (valid keys: {', '.join(valid)})"


def _build(cls, values: dict[str, Any], prefix: str, problems: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    ok = True
    for key, value in values.items():
        if key not in fields:
            problems.append(_unknown(f"{prefix}.{key}", key, fields))
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except TypeError as e:
            problems.append(f"{prefix}.{key}: received {value!r}; expected {e}")
    for name, f in fields.items():
        required = (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if required and name not in kwargs:
            if name not in values:
                problems.append(
                    f"{prefix}.{name}: missing (expected {_describe(hints[name])})"
                )
            ok = False
    if not ok:
        return None
    return cls(**kwargs)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts)
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, str(tp))


def _coerce(value: Any, tp) -> Any:
    """Checks `value` against the annotation `tp`; raises TypeError(expected)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = (
            difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            if isinstance(value, str)
            else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(_describe(tp) + hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except TypeError:
                pass
        raise TypeError(_describe(tp))
    if origin is tuple:
        (item,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise TypeError(_describe(tp))
        return tuple(_coerce(v, item) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(_describe(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(_describe(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(_describe(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(_describe(tp))
    raise TypeError(_describe(tp))


def _validate(spec: JobSpec, problems: list[str]) -> None:
    """Range checks that types alone cannot express."""
    d, m, t = spec.data, spec.model, spec.train

    def positive(path: str, value: int | float) -> None:
        if not (math.isfinite(value) and value > 0):  # nan > 0 is False too.
            problems.append(f"{path}: received {value!r}; expected a positive number")

    def non_negative(path: str, value: int | float) -> None:
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"{path}: received {value!r}; expected >= 0")

    positive("data.image_size", d.image_size)
    positive("data.num_classes", d.num_classes)
    non_negative("data.read_parallelism", d.read_parallelism)
    non_negative("data.shuffle_buffer", d.shuffle_buffer)
    non_negative("data.cache_budget_mb", d.cache_budget_mb)
    if d.class_names and len(d.class_names) != max(d.num_classes, 2):
        problems.append(
            f"data.class_names: received {len(d.class_names)} names; expected "
            f"{max(d.num_classes, 2)} (one per class; 2 for binary num_classes = 1)"
        )
    for path, url in (("data.train", d.train), ("data.validation", d.validation)):
        if not url.strip():
            problems.append(f"{path}: empty; expected a URL glob of TFRecord shards")
        else:
            _check_url(path, url, problems)
    if m.weights not in ("imagenet", "none"):
        _check_url("model.weights", m.weights, problems)
    if m.weights_mirror:
        _check_url("model.weights_mirror", m.weights_mirror, problems)
    for i, units in enumerate(m.dense):
        positive(f"model.dense[{i}]", units)
    if not 0.0 <= m.dropout < 1.0:
        problems.append(
            f"model.dropout: received {m.dropout!r}; expected 0 <= dropout < 1"
        )
    if not m.weights.strip():
        problems.append(
            'model.weights: empty; expected "imagenet", "none" or a .h5 / .weights.h5 URL'
        )
    elif m.weights not in ("imagenet", "none") and not m.weights.endswith(".h5"):
        problems.append(
            f'model.weights: received {m.weights!r}; expected "imagenet", "none" '
            "or the URL of a .h5 / .weights.h5 file"
        )
    if not 0 <= t.seed < 2**32:  # What Keras' set_random_seed takes.
        problems.append(f"train.seed: received {t.seed!r}; expected 0 <= seed < 2**32")
    positive("train.global_batch_size", t.global_batch_size)
    non_negative("train.eval_batch_size", t.eval_batch_size)
    positive("train.checkpoint_every_steps", t.checkpoint_every_steps)
    positive("train.keep_checkpoints", t.keep_checkpoints)
    positive("train.steps_per_execution", t.steps_per_execution)
    non_negative("train.early_stopping_patience", t.early_stopping_patience)
    positive("train.preemption_budget_seconds", t.preemption_budget_seconds)
    positive(
        "runtime.collective_timeout_seconds", spec.runtime.collective_timeout_seconds
    )
    _validate_phases(spec, problems)


def _check_url(path: str, url: str, problems: list[str]) -> None:
    from trainer import storage  # fsspec: imported once a spec has URLs to check.

    try:
        storage.check_url(url)
    except errors.BadURL as e:
        problems.append(f"{path}: {e}")


def _validate_phases(spec: JobSpec, problems: list[str]) -> None:
    """Range checks of the `[[phases]]` entries."""
    if spec.phases and not any(p.epochs for p in spec.phases):
        problems.append(
            "phases: every phase has epochs = 0 (skipped), so nothing would "
            "train; give one phase epochs > 0"
        )
    for p in spec.phases:
        # 0 skips the phase (e.g. `--set=phases.finetune.epochs=0`: head only).
        if p.epochs < 0:
            problems.append(
                f"phases.{p.name}.epochs: received {p.epochs!r}; expected >= 0"
            )
        if not (math.isfinite(p.learning_rate) and p.learning_rate > 0):
            problems.append(
                f"phases.{p.name}.learning_rate: received {p.learning_rate!r}; "
                "expected a positive number"
            )
        if p.steps_per_epoch < 0:
            problems.append(
                f"phases.{p.name}.steps_per_epoch: received "
                f"{p.steps_per_epoch!r}; expected >= 0"
            )
        if not p.trainable_from.strip():
            problems.append(
                f'phases.{p.name}.trainable_from: empty; expected "none", "all" '
                "or a layer name (see `trainer layers --backbone=NAME`)"
            )


# ---------------------------------------------------------------------------
# Overrides


def apply_overrides(
    raw: dict[str, Any], overrides: typing.Sequence[str], problems: list[str]
) -> dict[str, Any]:
    """Returns a copy of `raw` with `KEY=VALUE` overrides applied.

    Values are typed by the target field: `train.seed=3` is an int,
    `model.dense=[256,128]` a list, `model.weights=none` a string. A value that
    is valid TOML is parsed as TOML; otherwise it is taken as a string.
    """
    raw = json.loads(json.dumps(raw))  # Deep copy of plain TOML data.
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. train.seed=1")
            continue
        parts = key.split(".")
        if parts[0] == "phases":
            _override_phase(raw, key, parts, text, problems)
            continue
        if parts[0] == "name" and len(parts) == 1:
            raw["name"] = text
            continue
        if parts[0] not in _SECTIONS or len(parts) != 2:
            valid = [*_SECTIONS, "name", "phases"]
            if parts[0] not in _SECTIONS and parts[0] != "name":
                problems.append(
                    f"--set {key}: " + _unknown(key, parts[0], valid).split(": ", 1)[1]
                )
            else:
                problems.append(f"--set {key}: expected SECTION.FIELD, e.g. train.seed")
            continue
        cls = _SECTIONS[parts[0]]
        value = _typed_value(cls, parts[1], text, key, problems)
        if value is not _SKIP:
            raw.setdefault(parts[0], {})[parts[1]] = value
    return raw


_SKIP = object()


def _override_phase(raw, key, parts, text, problems) -> None:
    phases = raw.setdefault("phases", [])
    if len(parts) != 3:
        problems.append(
            f"--set {key}: expected phases.PHASE_NAME.FIELD, e.g. phases.finetune.epochs"
        )
        return
    names = [p.get("name") for p in phases if isinstance(p, dict)]
    if parts[1] not in names:
        close = difflib.get_close_matches(parts[1], [str(n) for n in names], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(
            f"--set {key}: no phase named {parts[1]!r}{hint} (phases: {', '.join(map(str, names))})"
        )
        return
    value = _typed_value(PhaseConfig, parts[2], text, key, problems)
    if value is not _SKIP:
        phases[names.index(parts[1])][parts[2]] = value


def _typed_value(cls, field: str, text: str, key: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    if field not in hints:
        problems.append(
            f"--set {key}: " + _unknown(key, field, hints).split(": ", 1)[1]
        )
        return _SKIP
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # A bare word: take it as a string.
    tp = hints[field]
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and _accepts(tp, str)
        and not _accepts(tp, type(value))
    ):
        value = text
    if isinstance(value, bool) and not _accepts(tp, bool) and _accepts(tp, str):
        value = text
    return value


def _accepts(tp, kind) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts(a, kind) for a in typing.get_args(tp))
    if origin is Literal:
        return any(type(a) is kind for a in typing.get_args(tp))
    if kind is int and tp is float:
        return True
    return tp is kind
