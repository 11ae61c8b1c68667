"""The run spec's own rules, in process: unknown keys, `--set` override syntax, dotted error names, every shipped
spec, and every `ORIGINAL_FLAGS` target. No model, no data, no process group."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from of_ds.spec import ORIGINAL_FLAGS, DatasetSpec, RunSpec, SpecError, apply_overrides

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "launch" / "specs").glob("*.yaml"))


def minimal() -> dict:
    """The smallest valid spec: two datasets (the demo LM is named by path; validation does not read it)."""
    return {
        "model": {"lm": {"name_or_path": "some/lm"}},
        "data": {"datasets": [
            {"name": "laion", "kind": "laion", "shards": "a/{0..3}.tar", "batch_size": 8},
            {"name": "mmc4", "kind": "mmc4", "shards": ["b/0.tar", "b/1.tar"], "batch_size": 4},
        ]},
    }


def problems_of(data: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as err:
        RunSpec.from_dict(apply_overrides(data, overrides or []))
    return err.value.problems


def test_minimal_spec_validates_with_defaults():
    spec = RunSpec.from_dict(minimal())
    assert [d.name for d in spec.data.datasets] == ["laion", "mmc4"]
    assert spec.dataset("mmc4").effective_max_tokens() == 256 and spec.dataset("laion").effective_max_tokens() == 32
    with pytest.raises(KeyError):
        spec.dataset("nosuch")
    assert RunSpec.from_dict(yaml.safe_load(spec.to_yaml())) == spec  # the resolved YAML reads back as the same spec


@pytest.mark.parametrize("place, key", [
    ((), "optimizer"),  # a section
    (("optim",), "lrr"),
    (("model", "vision"), "pretrained_path"),
    (("logging", "wandb"), "projekt"),
])
def test_unknown_key_is_refused_naming_its_dotted_field(place, key):
    data = minimal()
    node = data
    for part in place:
        node = node.setdefault(part, {})
    node[key] = 1
    assert problems_of(data) == [".".join((*place, key)) + ": unknown key"]


def test_unknown_dataset_key_is_named_by_the_dataset_name():
    data = minimal()
    data["data"]["datasets"][1]["max_image"] = 3
    assert problems_of(data) == ["data.datasets.mmc4.max_image: unknown key"]


def test_a_nameless_dataset_is_named_by_its_position():
    data = minimal()
    del data["data"]["datasets"][1]["name"]
    assert problems_of(data) == ["data.datasets.1.name: required field is missing"]


def test_every_problem_is_reported_at_once_each_with_its_dotted_name():
    problems = problems_of(minimal(), ["optim.lr=-1", "data.datasets.laion.batch_size=0", "engine.kind=horovod", "run.bogus=1"])
    assert len(problems) == 4
    assert {p.split(":", 1)[0] for p in problems} == {"optim.lr", "data.datasets.laion.batch_size", "engine.kind", "run.bogus"}
    assert any(p.startswith("data.datasets.laion.batch_size:") and "(got 0)" in p for p in problems)


def test_cross_field_problems_name_their_fields():
    problems = problems_of(minimal(), ["data.datasets.1.name=laion", "engine.kind=ddp", "engine.offload_optimizer=cpu"])
    assert "data.datasets.laion.name: dataset names must be unique ('laion' appears 2 times)" in problems
    assert any(p.startswith("engine.offload_optimizer:") for p in problems)
    assert problems_of(minimal(), ["data.datasets.mmc4.min_images=7", "data.datasets.mmc4.max_images=6"]) == [
        "data.datasets.mmc4.min_images: 7 exceeds max_images 6"]


def test_validation_fields_are_checked_together():
    assert problems_of(minimal(), ["checkpoint.keep_best=true", "data.datasets.laion.val_batches=2"]) == [
        "data.datasets.laion.val_batches: given, but data.datasets.laion.val_shards is not",
        "checkpoint.keep_best: needs validation (data.datasets[*].val_shards and logging.eval_every_n_steps > 0)"]
    held_out = ["data.datasets.laion.val_shards=v/0.tar", "checkpoint.keep_best=true"]
    assert problems_of(minimal(), [*held_out, "checkpoint.every_n_steps=150", "logging.eval_every_n_steps=100"]) == [
        "checkpoint.keep_best: checkpoint.every_n_steps (150) must be a multiple of logging.eval_every_n_steps (100), "
        "so that every checkpoint has its validation loss"]
    spec = RunSpec.from_dict(apply_overrides(minimal(), [*held_out, "checkpoint.every_n_steps=200", "logging.eval_every_n_steps=100"]))
    assert spec.dataset("laion").val_shards == "v/0.tar" and spec.dataset("mmc4").val_shards is None


def test_error_message_counts_problems_and_names_the_source():
    err = SpecError(["a.b: x", "c: y"], source="s.yaml")
    assert str(err).splitlines() == ["invalid run spec s.yaml (2 problems):", "  - a.b: x", "  - c: y"]


# --------------------------------------------------------------------------------------------------- overrides
def test_override_values_are_parsed_as_yaml():
    out = apply_overrides(minimal(), [
        "optim.lr=2e-4", "engine.compile=true", "run.name=my run", "run.max_steps=12",
        "model.vision.pretrained=null", "run.output_dir=", "checkpoint.keep_last= 3",
    ])
    assert out["engine"]["compile"] is True and out["run"]["name"] == "my run"
    assert RunSpec.from_dict(out).optim.lr == 2e-4  # PyYAML reads `2e-4` as a string; the field's validation makes it a float
    assert out["run"]["max_steps"] == 12 and out["model"]["vision"]["pretrained"] is None
    assert out["run"]["output_dir"] == "" and out["checkpoint"]["keep_last"] == 3


def test_override_lists_and_dicts():
    out = apply_overrides(minimal(), [
        "data.datasets.mmc4.shards=[c/0.tar, c/1.tar, c/2.tar]",
        "engine.compile_targets=[lm]",
        "model.lm.config={model_type: llama, hidden_size: 64}",
    ])
    assert out["data"]["datasets"][1]["shards"] == ["c/0.tar", "c/1.tar", "c/2.tar"]
    assert out["engine"]["compile_targets"] == ["lm"]
    assert out["model"]["lm"]["config"] == {"model_type": "llama", "hidden_size": 64}


def test_override_addresses_datasets_by_name_and_by_position():
    out = apply_overrides(minimal(), ["data.datasets.mmc4.batch_size=2", "data.datasets.0.loss_weight=0.5",
                                      "data.datasets.1.shards.0=z.tar"])
    laion, mmc4 = out["data"]["datasets"]
    assert mmc4["batch_size"] == 2 and laion["loss_weight"] == 0.5 and mmc4["shards"] == ["z.tar", "b/1.tar"]
    spec = RunSpec.from_dict(out)
    assert spec.dataset("mmc4").batch_size == 2 and spec.dataset("laion").loss_weight == 0.5


def test_override_creates_missing_sections_and_leaves_its_input_alone():
    data = minimal()
    out = apply_overrides(data, ["logging.wandb.project=p"])
    assert out["logging"]["wandb"]["project"] == "p" and "logging" not in data


@pytest.mark.parametrize("override, says", [
    ("optim.lr", "expected key.path=value"),
    ("data.datasets.nosuch.batch_size=1", "no list entry named 'nosuch'"),
    ("data.datasets.7.batch_size=1", "no such place in the spec"),
    ("optim.lr.a.b=1", "under a value, not a section"),
])
def test_bad_overrides_are_refused_naming_the_override(override, says):
    data = minimal()
    data["optim"] = {"lr": 1e-4}
    with pytest.raises(SpecError) as err:
        apply_overrides(data, [override])
    (problem,) = err.value.problems
    assert problem.startswith(f"override '{override}'") and says in problem


def test_from_yaml_applies_overrides_and_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert RunSpec.from_yaml(path, ["optim.lr=0.5"]).optim.lr == 0.5
    with pytest.raises(SpecError, match=re.escape(str(path))):
        RunSpec.from_yaml(path, ["optim.nope=1"])
    path.write_text("- a list\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        RunSpec.from_yaml(path)
    with pytest.raises(SpecError, match="spec file not found"):
        RunSpec.from_yaml(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------ shipped specs
def test_specs_are_shipped():
    assert {p.name for p in SPECS} >= {"demo.yaml", "openflamingo-3b.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # relative paths (ds_configs, demo data) are the repository's
    spec = RunSpec.from_yaml(path)
    assert RunSpec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    names = [d.name for d in spec.data.datasets]
    assert len(set(names)) == len(names)
    for name in names:  # each dataset can be addressed by name, as the docs' --set examples do
        assert RunSpec.from_yaml(path, [f"data.datasets.{name}.batch_size=1"]).dataset(name).batch_size == 1


# ------------------------------------------------------------------------------------------ the original's flags
def _field_type(model: type[BaseModel], name: str):
    if name not in model.model_fields:
        return None
    return model.model_fields[name].annotation


def _resolve(path: str) -> bool:
    """Whether dotted `path` names a RunSpec field; `<...>` stands for one dataset of `data.datasets`."""
    node: typing.Any = RunSpec
    for part in path.split("."):
        while typing.get_origin(node) is not None:  # Optional[X], list[X], Union[...]: the model inside
            models = [a for a in typing.get_args(node) if isinstance(a, type) and issubclass(a, BaseModel)]
            node = models[0] if models else None
        if part.startswith("<") and part.endswith(">"):
            if node is not DatasetSpec:
                return False
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return False
        node = _field_type(node, part)
        if node is None:
            return False
    return True


def test_resolve_tells_fields_from_non_fields():
    assert _resolve("data.datasets.<mmc4>.batch_size") and _resolve("logging.wandb.mode") and _resolve("optim.lr")
    assert not _resolve("data.datasets.<mmc4>.nope") and not _resolve("optim.lr.x") and not _resolve("optim.<x>")


_NOT_A_FIELD = ("not supported", "always on")
_DOTTED = re.compile(r"\b[a-z_]+(?:\.(?:[a-z_0-9]+|<[a-z]+>))+")


@pytest.mark.parametrize("flag", sorted(ORIGINAL_FLAGS), ids=str)
def test_every_original_flag_targets_an_existing_field(flag):
    target = ORIGINAL_FLAGS[flag]
    assert flag.startswith("--")
    if target.startswith(_NOT_A_FIELD):
        return
    fields = _DOTTED.findall(target)
    assert fields and target.startswith(fields[0]), f"{flag}: {target!r} does not start with a dotted field"
    for field in fields:
        assert _resolve(field), f"{flag} -> {field}: no such field in RunSpec"


def test_updated_copies_each_section_it_reaches_into():
    """`updated`: dotted keys change nested sections, each copied; the original spec is untouched (it is read-only)."""
    spec = RunSpec.from_yaml(REPO / "launch/specs/demo.yaml")
    new = spec.updated({"checkpoint.resume_from": "x", "run.seed": 7, "model.lm.config": {"model_type": "llama"}})
    assert (new.checkpoint.resume_from, new.run.seed, new.model.lm.config) == ("x", 7, {"model_type": "llama"})
    assert (spec.checkpoint.resume_from, spec.run.seed, spec.model.lm.config) == (None, 42, None)
    assert new.data is spec.data and new.model.vision is spec.model.vision  # what no key reaches is shared, not copied
