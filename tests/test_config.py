"""Job spec parsing, overrides and every class of spec error."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from trainer import config

ROOT = pathlib.Path(__file__).resolve().parents[1]

MINIMAL = """
name = "t"
[data]
train = "d/train-*"
validation = "d/validation-*"
image_size = 32
num_classes = 10
[[phases]]
name = "transfer"
epochs = 1
learning_rate = 1e-3
"""


def test_every_shipped_job_parses():
    for path in sorted((ROOT / "jobs").glob("*.toml")):
        spec = config.load(str(path))
        assert spec.phases, path


def test_digits_job_is_the_recipe():
    spec = config.load(str(ROOT / "jobs" / "digits.toml"))
    assert spec.model.backbone == "resnet50"
    assert spec.model.pooling == "flatten"
    assert spec.model.dense == (512,)
    assert spec.data.image_size == 32
    assert [p.name for p in spec.phases] == ["transfer", "finetune"]
    assert spec.phases[0].trainable_from == "none"
    assert spec.phases[1].trainable_from == "res5a_branch2a"


def test_defaults_and_frozen():
    spec = config.load(MINIMAL, is_text=True)
    assert spec.train.global_batch_size == 64
    assert spec.model.backbone == "resnet50"
    assert spec.phase_jit(spec.phases[0]) == "auto"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.seed = 3  # type: ignore[misc]


def test_overrides_typed_by_field():
    spec = config.load(
        MINIMAL,
        [
            "train.seed=7",
            "train.deterministic=true",
            "phases.transfer.learning_rate=1",  # int literal into a float field
            "phases.transfer.jit_compile=false",
            "model.dense=[256, 128]",
            "model.weights=none",  # bare word -> string
            "name=renamed",
            "data.train=gs://bucket/train-*",
        ],
        is_text=True,
    )
    assert spec.train.seed == 7 and spec.train.deterministic is True
    assert spec.phases[0].learning_rate == 1.0
    assert spec.phases[0].jit_compile is False
    assert spec.model.dense == (256, 128)
    assert spec.model.weights == "none"
    assert spec.name == "renamed"
    assert spec.data.train == "gs://bucket/train-*"


def test_jit_compile_accepts_bool_or_auto():
    spec = config.load(MINIMAL, ["train.jit_compile=true"], is_text=True)
    assert spec.train.jit_compile is True
    with pytest.raises(
        config.SpecError, match=r"train.jit_compile: received 'sometimes'"
    ):
        config.load(MINIMAL, ["train.jit_compile=sometimes"], is_text=True)


def test_all_problems_collected_in_one_error():
    text = (
        MINIMAL.replace("num_classes = 10", "num_clases = 10")
        + """
[train]
global_batch_size = 0
sed = 1
[runtime]
strategy = "mirorred"
"""
    )
    with pytest.raises(config.SpecError) as info:
        config.load(text, ["phases.trasfer.epochs=2"], is_text=True)
    err = info.value
    message = str(err)
    assert len(err.problems) == 6, message
    assert "data.num_clases: unknown key; did you mean 'num_classes'?" in message
    assert "data.num_classes: missing (expected an integer)" in message
    assert "train.global_batch_size: received 0; expected a positive number" in message
    assert "train.sed: unknown key; did you mean 'seed'?" in message
    assert "did you mean 'mirrored'?" in message
    assert "no phase named 'trasfer'; did you mean 'transfer'?" in message


@pytest.mark.parametrize(
    "text, match",
    [
        (
            'name = "t"\n[[phases]]\nname="a"\nepochs=1\nlearning_rate=1.0',
            r"data: missing table",
        ),
        (MINIMAL.split("[[phases]]")[0], r"phases: empty"),
        (
            MINIMAL.replace("epochs = 1", 'epochs = "one"'),
            r"phases.transfer.epochs: received 'one'; expected an integer",
        ),
        (
            MINIMAL.replace("epochs = 1", "epochs = -1"),
            r"phases.transfer.epochs: received -1; expected >= 0",
        ),
        (
            MINIMAL.replace("epochs = 1", "epochs = 0"),
            r"phases: every phase has epochs = 0 \(skipped\)",
        ),
        (
            MINIMAL.replace("image_size = 32", "image_size = true"),
            r"data.image_size: received True; expected an integer",
        ),
        (
            MINIMAL + '[model]\npooling = "max"\n',
            r"model.pooling: received 'max'; expected one of 'flatten', 'avg'",
        ),
        (MINIMAL + "[model]\ndropout = 1.5\n", r"model.dropout: received 1.5"),
        (
            MINIMAL + '[model]\nweights = "weights.bin"\n',
            r"model.weights: received 'weights.bin'",
        ),
        (
            MINIMAL
            + '[[phases]]\nname = "transfer"\nepochs = 1\nlearning_rate = 1.0\n',
            r"name 'transfer' used twice",
        ),
        (MINIMAL + 'colour = "red"\n', r"colour: unknown key"),
        (
            MINIMAL.replace("learning_rate = 1e-3", "learning_rate = nan"),
            r"phases.transfer.learning_rate: received nan; expected a positive number",
        ),
        (
            MINIMAL + "[train]\npreemption_budget_seconds = inf\n",
            r"train.preemption_budget_seconds: received inf; expected a positive",
        ),
        ("name = ", r"not valid TOML"),
    ],
)
def test_bad_specs(text, match):
    with pytest.raises(config.SpecError, match=match):
        config.load(text, is_text=True)


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.seed", r"expected KEY=VALUE"),
        ("trian.seed=1", r"did you mean 'train'"),
        ("train.seed.x=1", r"expected SECTION.FIELD"),
        ("phases.transfer=1", r"expected phases.PHASE_NAME.FIELD"),
        ("phases.transfer.epoch=1", r"did you mean 'epochs'"),
        (
            "train.global_batch_size=big",
            r"train.global_batch_size: received 'big'; expected an integer",
        ),
        (
            "train.export_saved_model=yes",
            r"train.export_saved_model: received 'yes'; expected true or false",
        ),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(config.SpecError, match=match):
        config.load(MINIMAL, [override], is_text=True)


def test_missing_file_names_path():
    with pytest.raises(FileNotFoundError, match=r"job spec not found: nope.toml"):
        config.load("nope.toml")


def test_round_trip_through_dict_and_shape_hash():
    spec = config.load(MINIMAL, is_text=True)
    again = config.from_dict(spec.to_dict())
    assert again == spec
    changed = config.load(MINIMAL, ["data.num_classes=3"], is_text=True)
    lr_only = config.load(MINIMAL, ["phases.transfer.learning_rate=0.5"], is_text=True)
    assert changed.shape_hash() != spec.shape_hash()
    assert lr_only.shape_hash() == spec.shape_hash()


def test_spec_from_memory_url():
    import fsspec

    with fsspec.open("memory://jobs/t.toml", "w") as f:
        f.write(MINIMAL)
    assert config.load("memory://jobs/t.toml").name == "t"
