"""ensembles.yaml validation: every error names the file and the key path; good files parse fully."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from handlers.config.files import load_ensembles, read_archive_manifest
from handlers.config.members import NAME
from handlers.config.policy import PolicySpec
from handlers.config.specs import Execution, InputSpec, StateDictRules, TensorSpec
from handlers.errors import ConfigError
from tests.conftest import image_input, write_tensor_ensemble


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    doc = yaml.safe_load(path.read_text())
    change(doc["ensembles"]["trio"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_valid_ensemble_parses_into_frozen_specs(ensemble_yaml: Callable[..., Path]) -> None:
    spec = load_ensembles(ensemble_yaml())["trio"]
    assert (spec.name, spec.version, spec.task, spec.labels) == ("trio", "2.1", "multiclass", ("cat", "dog", "fox"))
    assert spec.policy == PolicySpec("mean")
    assert [m.name for m in spec.members] == ["mobile", "pool_rgb", "pool_gray"]
    assert [m.weight for m in spec.members] == [1.0, 2.0, 1.0]
    assert spec.member_input(spec.members[0]) == InputSpec(size=(32, 32))
    assert spec.member_input(spec.members[2]) == InputSpec(size=(24, 24), color_mode="L", mean=(0.5,), std=(0.5,))
    with pytest.raises(AttributeError):
        spec.version = "3"  # type: ignore[misc]


def test_answer_options_parse_with_member_overrides(ensemble_yaml: Callable[..., Path]) -> None:
    def change(e: dict[str, Any]) -> None:
        e.update(top_k=2, consistency="batch_invariant")
        e["input"]["tta"] = "hflip"
        e["members"][1]["input"] = {"tta": "ten_crop"}

    spec = load_ensembles(edit(ensemble_yaml(), change))["trio"]
    assert (spec.top_k, spec.consistency) == (2, "batch_invariant")
    assert [image_input(spec.member_input(m)).tta for m in spec.members] == ["hflip", "ten_crop", "hflip"]
    assert [spec.member_input(m).views for m in spec.members] == [2, 10, 2]
    assert image_input(spec.member_input(spec.members[1])).load_size == (37, 37)
    assert spec.to_dict()["members"][1]["input"]["tta"] == "ten_crop"
    assert (spec.to_dict()["top_k"], spec.to_dict()["consistency"]) == (2, "batch_invariant")


def test_answer_options_default_to_one_label_fast_and_no_views(ensemble_yaml: Callable[..., Path]) -> None:
    spec = load_ensembles(ensemble_yaml())["trio"]
    assert (spec.top_k, spec.consistency, image_input(spec.input).tta, spec.input.views) == (1, "fast", "none", 1)
    assert load_ensembles(ensemble_yaml(task="binary"))["trio"].top_k is None


def test_shipped_ensembles_yaml_is_valid() -> None:
    specs = load_ensembles(Path("ensembles.yaml"), check_files=False)
    assert sorted(specs) == ["digits", "faces", "multishape", "shapes"]
    assert specs["shapes"].task == "binary" and specs["shapes"].positive_label == "present"
    assert [(m.output.select, m.output.kind, m.requires) for m in specs["faces"].members] == [
        ((1,), "probabilities", "facenet-pytorch==2.6.0"),
        ((1,), "probabilities", "facenet-pytorch==2.6.0"),
        ((2,), "probabilities", "facenet-pytorch==2.6.0"),
    ]


PREFIX = "ensembles.yaml: ensembles.trio"
RULES = f"{PREFIX}.members[0].state_dict"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda e: e.update(colour="red"),
            f"{PREFIX}.colour: unknown key; valid keys here: batching, consistency, deadline, defer, execution, input, "
            "labels, limits, members, policy, positive_label, task, top_k, version",
            id="unknown-key",
        ),
        pytest.param(lambda e: e.pop("labels"), f"{PREFIX}: missing key 'labels'", id="missing-key"),
        pytest.param(
            lambda e: e.update(version=2.1),
            f"{PREFIX}.version: expected a quoted version string like '1.0', got 2.1",
            id="version-not-string",
        ),
        pytest.param(
            lambda e: e.update(task="regression"),
            f"{PREFIX}.task: expected one of multiclass, binary, multilabel, got 'regression'",
            id="bad-task",
        ),
        pytest.param(
            lambda e: e.update(labels=["cat", "cat"]),
            f"{PREFIX}.labels: duplicate labels in ['cat', 'cat']",
            id="duplicate-labels",
        ),
        pytest.param(
            lambda e: e.update(task="binary", labels=["no", "yes"]),
            f"{PREFIX}: missing key 'positive_label' (required for task binary)",
            id="binary-no-positive",
        ),
        pytest.param(
            lambda e: e.update(positive_label="cat"),
            f"{PREFIX}.positive_label: only binary ensembles take a positive_label; this one is multiclass",
            id="positive-on-multiclass",
        ),
        pytest.param(
            lambda e: e["members"][2].update(arch="torchvision:resnet19"),
            f"{PREFIX}.members[2].arch: unknown torchvision model 'resnet19'",
            id="unknown-torchvision",
        ),
        pytest.param(
            lambda e: e["members"][2].update(arch="timm:resnet19"),
            f"{PREFIX}.members[2].arch: unknown timm model 'resnet19'; closest: resnet18, resnet61q, resnet51q",
            id="unknown-timm",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="fixture_models.py:Missing"),
            f"{PREFIX}.members[1].arch: model file fixture_models.py defines no top-level class 'Missing'",
            id="unknown-class",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="resnet18"),
            f"{PREFIX}.members[1].arch: expected 'torchvision:<builder>', 'timm:<model>', "
            "'transformers:<path/to/folder>', '<path/to/file.py>:<Class>' or '<package.module>:<Name>', got "
            "'resnet18'",
            id="arch-form",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="transformers:no_such_folder"),
            f"{PREFIX}.members[1].arch: cannot read the Hugging Face config {{dir}}/no_such_folder/config.json: "
            "[Errno 2] No such file or directory: '{dir}/no_such_folder/config.json'; a transformers: member "
            "names a folder save_pretrained wrote",
            id="transformers-no-folder",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="no_such_package.models:Net"),
            f"{PREFIX}.members[1].requires: cannot tell which package to pin for module 'no_such_package': no "
            "installed distribution provides it; install it, or name it with requires: "
            "'<distribution>==<version>'",
            id="package-not-installed",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="no_such_package.models:Net", requires="no-such-package==1.0"),
            f"{PREFIX}.members[1].requires: package member needs no-such-package==1.0, and this environment does "
            "not have no-such-package; install it where the ensemble runs: pip install 'no-such-package==1.0'",
            id="package-requirement-missing",
        ),
        pytest.param(
            lambda e: e["members"][0].update(arch="timm:resnet18", requires="timm==0.9.0"),
            f"{PREFIX}.members[0].requires: timm member needs timm==0.9.0, and this environment has timm 1.0.31; "
            "install it where the ensemble runs: pip install 'timm==0.9.0'",
            id="package-other-version",
        ),
        pytest.param(
            lambda e: e["members"][0].update(requires="torchvision==0.29.1"),
            f"{PREFIX}.members[0].requires: requires is for timm, transformers and package members; torchvision "
            "members run code this project pins",
            id="requires-torchvision",
        ),
        pytest.param(
            lambda e: e["members"][1].update(arch="torch.nn:NoSuchLayer"),
            f"{PREFIX}.members[1].arch: module torch.nn defines no class or function 'NoSuchLayer'",
            id="package-no-name",
        ),
        pytest.param(
            lambda e: e["members"][0].pop("weights"), f"{PREFIX}.members[0]: missing key 'weights'", id="weights-absent"
        ),
        pytest.param(
            lambda e: e["members"][0].update(output={"select": -1}),
            f"{PREFIX}.members[0].output.select: expected a tuple or list index (an integer from 0) or a key or "
            "attribute name, got -1",
            id="select-negative",
        ),
        pytest.param(
            lambda e: e["members"][0].update(output={"select": []}),
            f"{PREFIX}.members[0].output.select: expected an index, a name, or a non-empty list of them, e.g. "
            "[0, logits]",
            id="select-empty",
        ),
        pytest.param(
            lambda e: e["members"][0].update(output={"kind": "softmax"}),
            f"{PREFIX}.members[0].output.kind: expected one of logits, probabilities, got 'softmax'",
            id="output-kind",
        ),
        pytest.param(
            lambda e: e["members"][0].update(labels=["cat", "dog"]),
            f"{PREFIX}.members[0].labels: member 'mobile' has no output for ['fox']: a multiclass member scores "
            "every label of the ensemble ['cat', 'dog', 'fox'], and may have more",
            id="member-label-missing",
        ),
        pytest.param(
            lambda e: e["members"][0].update(labels=["cat", "dog", "cat"]),
            f"{PREFIX}.members[0].labels: duplicate labels in ['cat', 'dog', 'cat']",
            id="member-label-twice",
        ),
        pytest.param(
            lambda e: (e.update(task="multilabel"), e["members"][0].update(labels=["cat", "wolf"])),
            f"{PREFIX}.members[0].labels: unknown labels ['wolf']; this ensemble's labels are ['cat', 'dog', 'fox']",
            id="multilabel-unknown-label",
        ),
        pytest.param(
            lambda e: (e.update(task="multilabel"), [m.update(labels=["cat", "dog"]) for m in e["members"]]),
            f"{PREFIX}.labels: no member scores ['fox']; every label needs at least one member",
            id="multilabel-uncovered",
        ),
        pytest.param(lambda e: e["members"][0].update(weights="gone.pt"), "gone.pt", id="missing-weights"),
        pytest.param(
            lambda e: e["members"][1].update(name="mobile"),
            f"{PREFIX}.members[1].name: duplicate member name 'mobile'",
            id="duplicate-member",
        ),
        pytest.param(
            lambda e: e["members"][0].update(weight=0),
            f"{PREFIX}.members[0].weight: expected a number in (0.0, 1000000.0], got 0",
            id="zero-weight",
        ),
        pytest.param(
            lambda e: e["members"][0].update(sha256="abc"),
            f"{PREFIX}.members[0].sha256: expected a lowercase hex sha256, got 'abc'",
            id="bad-sha",
        ),
        pytest.param(
            lambda e: e["members"][0].update(kwargs=[1]),
            f"{PREFIX}.members[0].kwargs: expected a mapping of keyword argument names to values",
            id="kwargs-list",
        ),
        pytest.param(
            lambda e: e.update(members=[]), f"{PREFIX}.members: expected a non-empty list of members", id="no-members"
        ),
        pytest.param(
            lambda e: e["input"].update(size=[32]),
            f"{PREFIX}.input.size: expected a list of 2 integers, got [32]",
            id="size-shape",
        ),
        pytest.param(
            lambda e: e["input"].update(size=[32, 4]),
            f"{PREFIX}.input.size[1]: expected an integer from 8 to 4096, got 4",
            id="size-range",
        ),
        pytest.param(
            lambda e: e["input"].update(resize="squash"),
            f"{PREFIX}.input.resize: expected one of stretch, center_crop, got 'squash'",
            id="resize-mode",
        ),
        pytest.param(
            lambda e: e["input"].update(mean=[0.5]),
            f"{PREFIX}.input.mean: expected a list of 3 numbers, got [0.5]",
            id="mean-channels",
        ),
        pytest.param(
            lambda e: e["input"].update(std=[0.2, 0.2, 0]),
            f"{PREFIX}.input.std[2]: expected a number in [1e-06, 10.0], got 0",
            id="std-zero",
        ),
        pytest.param(
            lambda e: e["input"].update(type="audio"),
            f"{PREFIX}.input.type: expected one of image, tensor, got 'audio'",
            id="input-type",
        ),
        pytest.param(
            lambda e: e["members"][1].update(input={"type": "tensor", "shape": [8]}),
            f"{PREFIX}.members[1].input: only a whole ensemble takes tensor input; members of an image ensemble "
            "take images",
            id="member-tensor",
        ),
        pytest.param(
            lambda e: e.update(policy={"name": "vote"}),
            f"{PREFIX}.policy.name: expected one of all, any, cascade, k_of_n, majority, max, mean, got 'vote'",
            id="bad-policy",
        ),
        pytest.param(
            lambda e: e.update(policy={"name": "k_of_n", "k": 5}),
            f"{PREFIX}.policy: k must be an integer from 1 to 3, got 5",
            id="k-out-of-range",
        ),
        pytest.param(
            lambda e: e.update(batching={"batch_size": 0}),
            f"{PREFIX}.batching.batch_size: expected an integer from 1 to 1024, got 0",
            id="batch-size",
        ),
        pytest.param(
            lambda e: e.update(batching={"fuse_members": "yes"}),
            f"{PREFIX}.batching.fuse_members: expected true or false, got 'yes'",
            id="fuse-not-bool",
        ),
        pytest.param(
            lambda e: e.update(batching={"workers": True}),
            f"{PREFIX}.batching.workers: expected an integer from 1 to 64, got True",
            id="bool-not-int",
        ),
        pytest.param(
            lambda e: e.update(limits={"formats": ["JPEG", "XCF"]}),
            f"{PREFIX}.limits.formats[1]: unknown image format 'XCF'; known: JPEG, PNG, WEBP, BMP, GIF, TIFF",
            id="format",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"prefix": "m."}),
            f"{RULES}.prefix: unknown key; valid keys here: drop, key, rename, strip_prefix",
            id="rules-unknown-key",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"key": "a..b"}),
            f"{RULES}.key: expected a dotted path such as state_dict or model.ema, got 'a..b'",
            id="rules-key-not-dotted",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"strip_prefix": "module."}),
            f"{RULES}.strip_prefix: expected a list of at least 1 string(s), got 'module.'",
            id="rules-strip-not-list",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"rename": []}),
            f"{RULES}.rename: expected a non-empty list of [regex, replacement] pairs",
            id="rules-rename-empty",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"rename": [["a"]]}),
            f"{RULES}.rename[0]: expected a [regex, replacement] pair of strings, got ['a']",
            id="rules-rename-not-pair",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"rename": [["(", "x"]]}),
            f"{RULES}.rename[0][0]: invalid regular expression '(': missing ), unterminated subpattern at position 0",
            id="rules-rename-bad-regex",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"rename": [["a", "\\2"]]}),
            f"{RULES}.rename[0][1]: invalid replacement for 'a': invalid group reference 2 at position 1",
            id="rules-rename-bad-group",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"rename": [["(?P<x>a)", "\\g<y>"]]}),
            f"{RULES}.rename[0][1]: invalid replacement for '(?P<x>a)': unknown group name 'y'",
            id="rules-rename-unknown-name",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"drop": ["["]}),
            f"{RULES}.drop[0]: invalid regular expression '[': unterminated character set at position 0",
            id="rules-drop-bad-regex",
        ),
        pytest.param(
            lambda e: e["members"][0].update(state_dict={"drop": []}),
            f"{RULES}.drop: expected a list of at least 1 string(s), got []",
            id="rules-drop-empty",
        ),
        pytest.param(
            lambda e: e["input"].update(tta="twenty_crop"),
            f"{PREFIX}.input.tta: expected one of none, hflip, five_crop, ten_crop, got 'twenty_crop'",
            id="tta-unknown",
        ),
        pytest.param(
            lambda e: e["members"][1].update(input={"tta": "flip"}),
            f"{PREFIX}.members[1].input.tta: expected one of none, hflip, five_crop, ten_crop, got 'flip'",
            id="member-tta-unknown",
        ),
        pytest.param(
            lambda e: e.update(consistency="exact"),
            f"{PREFIX}.consistency: expected one of fast, batch_invariant, got 'exact'",
            id="consistency-unknown",
        ),
        pytest.param(
            lambda e: e.update(top_k=4),
            f"{PREFIX}.top_k: expected an integer from 1 to 3, got 4",
            id="top-k-beyond-labels",
        ),
        pytest.param(
            lambda e: e.update(task="multilabel", top_k=2),
            f"{PREFIX}.top_k: top_k ranks the labels of a multiclass ensemble; this one is multilabel",
            id="top-k-multilabel",
        ),
    ],
)
def test_invalid_ensemble_is_rejected_with_key_path(
    ensemble_yaml: Callable[..., Path], change: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = edit(ensemble_yaml(), change)
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    if message.startswith(PREFIX):
        assert str(caught.value) == message.format(dir=path.parent)
    else:
        assert str(caught.value) == f"{PREFIX}.members[0].weights: file not found: {path.parent / message}"


VECTORS = "ensembles.yaml: ensembles.vectors"


def edit_vectors(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    doc = yaml.safe_load(path.read_text())
    change(doc["ensembles"]["vectors"])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_tensor_input_ensemble_parses_and_round_trips(tmp_path: Path) -> None:
    spec = load_ensembles(write_tensor_ensemble(tmp_path / "src"))["vectors"]
    assert spec.input == TensorSpec(shape=(3, 4))
    assert [spec.member_input(m) for m in spec.members] == [TensorSpec(shape=(3, 4))] * 2
    again = tmp_path / "src" / "again.yaml"
    again.write_text(yaml.safe_dump({"ensembles": {"vectors": spec.to_dict()}}))
    assert load_ensembles(again)["vectors"] == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            lambda e: e["input"].update(size=[8, 8]),
            f"{VECTORS}.input.size: unknown key; valid keys here: shape, type",
            id="image-key",
        ),
        pytest.param(lambda e: e["input"].pop("shape"), f"{VECTORS}.input: missing key 'shape'", id="no-shape"),
        pytest.param(
            lambda e: e["input"].update(shape=[]),
            f"{VECTORS}.input.shape: expected a list of 1 to 4 integers, got []",
            id="empty-shape",
        ),
        pytest.param(
            lambda e: e["input"].update(shape=[3, 0]),
            f"{VECTORS}.input.shape[1]: expected an integer from 1 to 16000000, got 0",
            id="zero-dim",
        ),
        pytest.param(
            lambda e: e["input"].update(shape=[4000, 4001]),
            f"{VECTORS}.input.shape: 16004000 elements per instance; at most 16000000",
            id="too-big",
        ),
        pytest.param(
            lambda e: e["members"][0].update(input={"type": "tensor", "shape": [12]}),
            f"{VECTORS}.members[0].input: members of a tensor-input ensemble share its input; remove this "
            "member's input",
            id="member-override",
        ),
    ],
)
def test_invalid_tensor_input_is_rejected(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = edit_vectors(write_tensor_ensemble(tmp_path / "src"), change)
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    assert str(caught.value) == message


def test_ensemble_name_must_be_a_model_name(ensemble_yaml: Callable[..., Path]) -> None:
    path = ensemble_yaml(name="bad name")
    with pytest.raises(ConfigError, match=r"^ensembles.yaml: ensembles.bad name: ensemble name 'bad name' must match"):
        load_ensembles(path)


def test_unreadable_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ensembles.yaml"
    path.write_text("ensembles: [unclosed")
    with pytest.raises(ConfigError, match=r"^ensembles.yaml: cannot read: "):
        load_ensembles(path)


def test_missing_weights_are_allowed_before_training(ensemble_yaml: Callable[..., Path]) -> None:
    path = edit(ensemble_yaml(), lambda e: e["members"][0].update(weights="later.pt"))
    assert load_ensembles(path, check_files=False)["trio"].members[0].weights == "later.pt"


def test_state_dict_rules_parse_in_schema_order(ensemble_yaml: Callable[..., Path]) -> None:
    rules = {
        "key": "ckpt.ema",
        "drop": ["^criterion\\."],
        "strip_prefix": ["module.", "_orig_mod."],
        "rename": [["^fc\\.", "head."]],
    }
    path = edit(ensemble_yaml(), lambda e: e["members"][1].update(state_dict=rules))
    spec = load_ensembles(path)["trio"]
    assert spec.members[1].state_dict == StateDictRules(
        key="ckpt.ema", drop=("^criterion\\.",), strip_prefix=("module.", "_orig_mod."), rename=(("^fc\\.", "head."),)
    )
    assert spec.members[1].state_dict.to_dict() == rules
    assert spec.members[0].state_dict == StateDictRules()
    assert "state_dict" not in spec.to_dict()["members"][0]


def set_execution(ensemble: dict[str, Any]) -> None:
    ensemble["execution"] = {"compile": True}
    ensemble["members"][0]["execution"] = {"plan": "frozen"}
    ensemble["members"][1]["execution"] = {"compile": True}


def test_member_execution_overrides_the_ensembles_key_by_key(ensemble_yaml: Callable[..., Path]) -> None:
    spec = load_ensembles(edit(ensemble_yaml(), set_execution))["trio"]
    assert spec.execution == Execution(plan="auto", compile=True)
    assert [spec.member_execution(m) for m in spec.members] == [
        Execution(plan="frozen", compile=True),
        Execution(plan="auto", compile=True),
        Execution(plan="auto", compile=True),
    ]
    assert [m.execution for m in spec.members[1:]] == [None, None]
    eager = spec.with_plan("eager")
    assert {eager.member_execution(m) for m in eager.members} == {Execution(plan="eager")}


def test_to_dict_round_trips(ensemble_yaml: Callable[..., Path], tmp_path: Path) -> None:
    rules = {"key": "state_dict", "strip_prefix": ["module."]}

    def change(ensemble: dict[str, Any]) -> None:
        ensemble["members"][0]["state_dict"] = rules
        set_execution(ensemble)

    spec = load_ensembles(edit(ensemble_yaml(), change))["trio"]
    again = tmp_path / "ensemble" / "again.yaml"
    again.write_text(yaml.safe_dump({"ensembles": {"trio": spec.to_dict()}}))
    assert load_ensembles(again)["trio"] == spec


def test_every_error_is_reported_one_line_each(ensemble_yaml: Callable[..., Path]) -> None:
    def change(e: dict[str, Any]) -> None:
        e["members"][0]["weight"] = -1
        e["members"][2]["name"] = "bad name"
        e["batching"]["workers"] = 0

    with pytest.raises(ConfigError) as caught:
        load_ensembles(edit(ensemble_yaml(), change))
    assert str(caught.value).splitlines() == [
        f"{PREFIX}.batching.workers: expected an integer from 1 to 64, got 0",
        f"{PREFIX}.members[0].weight: expected a number in (0.0, 1000000.0], got -1",
        f"{PREFIX}.members[2].name: expected a name matching [A-Za-z][A-Za-z0-9_-]{{0,63}}, got 'bad name'",
    ]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param([1], "ensembles.yaml: expected a mapping, got list", id="not-a-mapping"),
        pytest.param({}, "ensembles.yaml: missing key 'ensembles'", id="no-ensembles"),
        pytest.param(
            {"ensembles": {}, "x": 1},
            "ensembles.yaml: x: unknown key; valid keys here: ensembles",
            id="unknown-top-key",
        ),
        pytest.param(
            {"ensembles": {}},
            "ensembles.yaml: ensembles: expected a mapping of ensemble names to ensembles",
            id="empty",
        ),
        pytest.param(
            {"ensembles": {1: {}}},
            "ensembles.yaml: ensembles: expected a mapping of ensemble names to ensembles",
            id="number-as-name",
        ),
    ],
)
def test_invalid_top_level_is_rejected(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "ensembles.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    assert str(caught.value) == message


def test_an_unknown_input_type_is_named_before_the_keys_it_would_take(tmp_path: Path) -> None:
    path = edit_vectors(write_tensor_ensemble(tmp_path / "src"), lambda e: e["input"].update(type=None))
    with pytest.raises(ConfigError) as caught:
        load_ensembles(path)
    assert str(caught.value) == f"{VECTORS}.input.type: expected one of image, tensor, got None"


def write_manifest(folder: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """An ensemble.json as the build writes it, for the test ensemble whose files are in `folder`."""
    spec = load_ensembles(folder / "ensembles.yaml")["trio"]
    manifest = {
        "format": 2,
        "name": "trio",
        "ensemble": spec.to_dict(),
        "digests": {"members/mobile.safetensors": "0" * 64},
        "build": {"torch": "2.14.1"},
        "sources": {member.name: {"file": member.weights} for member in spec.members},
    }
    change(manifest)
    (folder / "ensemble.json").write_text(json.dumps(manifest))
    return folder


def test_archive_manifest_is_read_by_the_same_models(ensemble_yaml: Callable[..., Path]) -> None:
    folder = write_manifest(ensemble_yaml().parent, lambda m: None)
    manifest = read_archive_manifest(folder)
    assert manifest.ensemble == load_ensembles(folder / "ensembles.yaml")["trio"]
    assert (dict(manifest.digests), dict(manifest.build)) == (
        {"members/mobile.safetensors": "0" * 64},
        {"torch": "2.14.1"},
    )
    assert dict(manifest.sources) == {
        "mobile": {"file": "mobile.pt"},
        "pool_rgb": {"file": "pool_rgb.pt"},
        "pool_gray": {"file": "pool_gray.pt"},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(lambda m: m.update(format=3), "format: unsupported manifest format 3; expected 2", id="format"),
        pytest.param(lambda m: m.pop("build"), "missing key 'build'", id="missing-key"),
        pytest.param(
            lambda m: m.update(name="bad name"),
            f"name: ensemble name 'bad name' must match {NAME} (it is the TorchServe model name)",
            id="name",
        ),
        pytest.param(
            lambda m: m["digests"].update(x="abc"), "digests.x: expected a lowercase hex sha256, got 'abc'", id="digest"
        ),
        pytest.param(lambda m: m.update(build=[]), "build: expected a mapping", id="build-not-mapping"),
        pytest.param(
            lambda m: m["sources"].pop("mobile"),
            "sources: expected one entry per member ['mobile', 'pool_rgb', 'pool_gray']",
            id="sources",
        ),
        pytest.param(
            lambda m: m["ensemble"]["members"][1].update(weights="gone.pt"),
            "ensemble.members[1].weights: file not found: {folder}/gone.pt",
            id="weights",
        ),
    ],
)
def test_invalid_archive_manifest_is_rejected_with_key_path(
    ensemble_yaml: Callable[..., Path], change: Callable[[dict[str, Any]], None], message: str
) -> None:
    folder = write_manifest(ensemble_yaml().parent, change)
    with pytest.raises(ConfigError) as caught:
        read_archive_manifest(folder)
    assert str(caught.value) == "ensemble.json: " + message.replace("{folder}", str(folder))
