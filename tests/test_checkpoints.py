"""Checkpoint layouts: every `state_dict:` option, every format, every error message, and the proposed fixes."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
import yaml
from safetensors.torch import load_file
from torch import nn

from archive_scripts import checkpoint_layouts as published
from archive_scripts.build_archives import build_archive, forgiven_lines
from archive_scripts.inspect_checkpoint import inspect
from handlers.config.files import load_ensembles
from handlers.config.specs import MemberSpec, StateDictRules
from handlers.errors import MemberLoadError
from handlers.weights.checkpoints import CONVERT, Fitted, Target, read_checkpoint
from handlers.weights.diagnosis import propose
from handlers.weights.loading import build_member, member_weights, sha256_of
from tests import checkpoint_layouts as layouts
from tests.checkpoint_layouts import CHEXNET_RULES, write_chexnet
from tests.fixture_models import NormNet, PoolNet

HERE = Path(__file__).parent
POOLNET = "fixture_models.py:PoolNet"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "fixture_models.py").write_bytes((HERE / "fixture_models.py").read_bytes())
    return tmp_path


def original_module(seed: int = 5) -> PoolNet:
    torch.manual_seed(seed)
    return layouts.randomize(PoolNet(num_classes=3), seed)


def original(seed: int = 5) -> dict[str, torch.Tensor]:
    return original_module(seed).state_dict()


def load(
    folder: Path, file_name: str, rules: dict[str, Any], *, arch: str = POOLNET, kwargs: dict | None = None
) -> dict[str, torch.Tensor]:
    """The member's weights as the build normalizes them, through ensembles.yaml's own parser."""
    return fit(folder, file_name, rules, arch=arch, kwargs=kwargs).state


def fit(
    folder: Path, file_name: str, rules: dict[str, Any], *, arch: str = POOLNET, kwargs: dict | None = None
) -> Fitted:
    """The member's weights as the build fits them, with what torch's own loading rules filled or dropped."""
    member = {
        "name": "m",
        "arch": arch,
        "kwargs": kwargs or {"num_classes": 3},
        "weights": file_name,
        "state_dict": rules,
    }
    if not rules:
        del member["state_dict"]
    spec = parse_member(folder, member)
    return member_weights(spec, folder, build_member(spec, folder))


def parse_member(folder: Path, member: dict[str, Any]) -> MemberSpec:
    doc = {
        "version": "1",
        "task": "multiclass",
        "labels": ["a", "b", "c"],
        "input": {"size": [16, 16]},
        "members": [member],
    }
    (folder / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": {"e": doc}}))
    return load_ensembles(folder / "ensembles.yaml")["e"].members[0]


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(published.data_parallel, id="dataparallel-module-prefix"),
        pytest.param(published.compiled, id="torch-compile-orig-mod"),
        pytest.param(published.lightning, id="lightning-dict"),
        pytest.param(published.safetensors_file, id="safetensors"),
        pytest.param(layouts.legacy_pickle_format, id="legacy-non-zip-format"),
        pytest.param(layouts.ema_with_loss_buffer, id="nested-key-and-drop"),
    ],
)
def test_layout_loads_exactly_the_saved_tensors(folder: Path, write: Callable[..., dict[str, Any]]) -> None:
    state = original()
    rules = write(original_module(), folder / "weights.bin")
    loaded = load(folder, "weights.bin", rules)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype for k in state)


def test_half_precision_weights_are_cast_to_the_members_dtype(folder: Path) -> None:
    state = original()
    loaded = load(folder, "half.safetensors", layouts.half_safetensors(original_module(), folder / "half.safetensors"))
    assert {tensor.dtype for tensor in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state)


def test_rules_apply_in_order_drop_strip_rename(folder: Path) -> None:
    state = original()
    torch.save(
        {
            "net.body.conv.weight": state["conv.weight"],
            "net.body.conv.bias": state["conv.bias"],
            "net.top.weight": state["head.weight"],
            "net.top.bias": state["head.bias"],
            "net.top.extra": torch.zeros(1),
        },
        folder / "w.pt",
    )
    rules = {"drop": [r"\.extra$"], "strip_prefix": ["net.", "body."], "rename": [["^top", "head"]]}
    loaded = load(folder, "w.pt", rules)
    assert all(torch.equal(loaded[k], state[k]) for k in state) and list(loaded) == list(state)


def message(folder: Path, file_name: str, rules: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(MemberLoadError) as caught:
        load(folder, file_name, rules, **kwargs)
    return str(caught.value)


class Custom:
    """A class of ours that a checkpoint pickles: weights_only=True must refuse it."""


def test_wrapper_dict_without_key_is_explained_with_the_fix(folder: Path) -> None:
    published.lightning(original_module(), folder / "lightning.ckpt")
    assert message(folder, "lightning.ckpt", {}) == (
        "member 'm': lightning.ckpt: the file is not a state_dict: besides tensors it holds epoch (int), "
        "global_step (int), hyper_parameters (dict), pytorch-lightning_version (str), state_dict (OrderedDict)\n"
        "This state_dict: block loads every tensor strictly; put it under the member in ensembles.yaml:\n"
        "  state_dict:\n"
        "    key: 'state_dict'\n"
        "    strip_prefix: ['model.']"
    )


def test_prefix_mismatch_gives_counts_five_examples_and_the_fix(folder: Path) -> None:
    published.data_parallel(original_module(), folder / "dp.pt")
    assert message(folder, "dp.pt", {}) == (
        "member 'm': dp.pt: weights do not fit fixture_models.py:PoolNet (strict loading): "
        "4 missing, 4 unexpected, 0 of another shape\n"
        "  missing (4): conv.weight, conv.bias, head.weight, head.bias\n"
        "  unexpected (4): module.conv.weight, module.conv.bias, module.head.weight, module.head.bias\n"
        "This state_dict: block loads every tensor strictly; put it under the member in ensembles.yaml:\n"
        "  state_dict:\n"
        "    strip_prefix: ['module.']"
    )


def test_long_key_lists_show_five_examples(folder: Path) -> None:
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(12)}, folder / "many.pt")
    text = message(folder, "many.pt", {})
    assert text.splitlines()[:3] == [
        (
            "member 'm': many.pt: weights do not fit fixture_models.py:PoolNet (strict loading): 4 missing, 12 "
            "unexpected, 0 of another shape"
        ),
        "  missing (4): conv.weight, conv.bias, head.weight, head.bias",
        "  unexpected (5 of 12): layer0.weight, layer1.weight, layer2.weight, layer3.weight, layer4.weight",
    ]


@pytest.mark.parametrize(
    ("content", "rules", "expected"),
    [
        pytest.param(
            {"epoch": 1, "weights": {}},
            {"key": "model"},
            "state_dict.key 'model': no entry 'model'; entries there: ['epoch', 'weights']",
            id="key-missing",
        ),
        pytest.param(
            {"a": {"b": 1}},
            {"key": "a.c"},
            "state_dict.key 'a.c': no entry 'c' under 'a'; entries there: ['b']",
            id="nested-key-missing",
        ),
        pytest.param(
            {"epoch": 1},
            {"key": "epoch"},
            "entry 'epoch' is a int, not a mapping of names to tensors",
            id="key-not-a-mapping",
        ),
        pytest.param(
            {"w": {"conv.weight": torch.zeros(1), "note": "x"}},
            {"key": "w"},
            "entry 'w' is not a state_dict: besides tensors it holds note (str)",
            id="selected-not-tensors",
        ),
        pytest.param({"w": {}}, {"key": "w"}, "entry 'w' holds no tensors", id="selected-empty"),
        pytest.param(
            {"a.weight": torch.zeros(1), "b.a.weight": torch.zeros(1)},
            {"strip_prefix": ["b."]},
            "keys 'a.weight' and 'b.a.weight' both become 'a.weight'; drop one or rename differently",
            id="collision",
        ),
    ],
)
def test_selection_and_remap_errors(folder: Path, content: dict, rules: dict[str, Any], expected: str) -> None:
    torch.save(content, folder / "c.pt")
    assert message(folder, "c.pt", rules).split("\n")[0] == f"member 'm': c.pt: {expected}"


def write_tar(path: Path) -> None:
    with tarfile.open(path, "w") as archive:
        for name in ("storages", "tensors", "pickle", "sys_info"):
            entry = tarfile.TarInfo(name)
            entry.size = 1
            archive.addfile(entry, io.BytesIO(b"x"))


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        pytest.param(
            lambda p: torch.save({"state_dict": original(), "note": Custom()}, p),
            "holds pickled Python objects (tests.test_checkpoints.Custom) that torch.load(weights_only=True) "
            "refuses, as in a whole model saved with torch.save(model) or a checkpoint with custom classes; it "
            f"is never loaded unsafely. {CONVERT}",
            id="custom-class-pickle",
        ),
        pytest.param(
            write_tar,
            f"saved in PyTorch's legacy tar format, which torch.load(weights_only=True) cannot read. {CONVERT}",
            id="legacy-tar-format",
        ),
        pytest.param(
            lambda p: p.write_bytes(b"hello, not weights"),
            "neither a PyTorch checkpoint (torch.save) nor a .safetensors file",
            id="junk",
        ),
        pytest.param(
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": [1, 2]}   '),
            "not a valid .safetensors file: Error while deserializing header: invalid JSON in header: invalid "
            "type: integer `1`, expected string or map at line 1 column 13",
            id="bad-safetensors",
        ),
        pytest.param(
            lambda p: p.write_bytes(zip_bytes()),
            "not a readable PyTorch checkpoint: RuntimeError: [enforce fail at inline_container.cc:180] . file "
            "in archive is not in a subdirectory: readme.txt",
            id="zip-not-torch",
        ),
    ],
)
def test_unreadable_files_say_why_and_how_to_convert(
    folder: Path, write: Callable[[Path], None], expected: str
) -> None:
    write(folder / "bad.pt")
    assert message(folder, "bad.pt", {}) == f"member 'm': bad.pt: {expected}"


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return buffer.getvalue()


def test_chexnet_layout_gets_the_exact_block_that_fits(tmp_path: Path) -> None:
    write_chexnet(tmp_path / "chexnet.pth.tar")
    target = Target.of(build_member(MemberSpec("c", "torchvision:densenet121", "x", {"num_classes": 14}), tmp_path))
    proposal = propose(read_checkpoint(tmp_path / "chexnet.pth.tar"), target)
    assert proposal is not None and proposal.mismatch.fits
    assert proposal.rules.to_dict() == CHEXNET_RULES
    assert proposal.block() == (
        "state_dict:\n"
        "  key: 'state_dict'\n"
        "  strip_prefix: ['module.', 'densenet121.']\n"
        "  rename:\n"
        "    - ['(denselayer\\d+\\.(?:norm|relu|conv))\\.([12])\\.', '\\1\\2.']  # torchvision DenseNet before "
        "0.4 (norm.1 -> norm1)\n"
        "    - ['^classifier\\.0\\.', 'classifier.']"
    )
    assert yaml.safe_load(proposal.block())["state_dict"] == CHEXNET_RULES


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        pytest.param(
            lambda s: {"model": {f"backbone.{k}": v for k, v in s.items()}, "criterion.w": torch.ones(2)},
            {"key": "model", "strip_prefix": ["backbone."]},
            id="nested-prefixed",
        ),
        pytest.param(
            lambda s: {**s, "criterion.w": torch.ones(2), "criterion.v": torch.ones(2)},
            {"drop": [r"^criterion\."]},
            id="drop-leftover-module",
        ),
        pytest.param(lambda s: {**s, "extra": torch.ones(2)}, {"drop": ["^extra$"]}, id="drop-leftover-key"),
    ],
)
def test_proposals_for_other_layouts(folder: Path, saved: Callable[[dict], dict], expected: dict[str, Any]) -> None:
    state = original()
    torch.save(saved(state), folder / "w.pt")
    proposal = propose(read_checkpoint(folder / "w.pt"), Target.of(PoolNet(num_classes=3)))
    assert proposal is not None and proposal.mismatch.fits
    assert proposal.rules.to_dict() == expected
    assert all(torch.equal(a, b) for a, b in zip(load(folder, "w.pt", expected).values(), state.values(), strict=True))


def test_prefix_the_architecture_has_and_the_file_lacks_is_added(folder: Path) -> None:
    torch.save(original(), folder / "w.pt")
    proposal = propose(
        read_checkpoint(folder / "w.pt"),
        Target({f"model.{k}": v for k, v in PoolNet(num_classes=3).state_dict().items()}),
    )
    assert proposal is not None and proposal.mismatch.fits
    assert proposal.rules == StateDictRules(rename=(("^", "model."),))


def test_nothing_fits_shows_the_closest_block_and_what_it_leaves(folder: Path) -> None:
    published.data_parallel(PoolNet(num_classes=4), folder / "dp.pt")
    assert message(folder, "dp.pt", {}).split("\n")[-5:] == [
        "The closest state_dict: block found still leaves 0 missing, 0 unexpected, 2 of another shape",
        "  another shape (2): head.weight: file [4, 8], model [3, 8]; head.bias: file [4], model [3]",
        "  state_dict:",
        "    strip_prefix: ['module.']",
        "Tensors of another shape mean another architecture: check the member's kwargs (num_classes, width, ...).",
    ]


def test_inspector_prints_layout_and_a_block_that_fits(tmp_path: Path) -> None:
    path = tmp_path / "chexnet.pth.tar"
    write_chexnet(path)
    report, fits = inspect(path, "torchvision:densenet121", {"num_classes": 14})
    assert fits
    lines = report.splitlines()
    assert lines[0] == f"{path}: {path.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(path)}"
    assert lines[1:13] == [
        "a checkpoint dict with 4 top-level entries:",
        "  epoch: int 7",
        "  arch: str 'densenet121'",
        "  best_loss: float 0.1532",
        "  state_dict: mapping of 606 entries (606 tensors)",
        "weights at key 'state_dict': 606 tensors, 28.2 MB",
        "  dtypes: float32 x606",
        "  prefix shared by every key: 'module.densenet121.'",
        "  first keys: module.densenet121.features.conv0.weight, module.densenet121.features.norm0.weight, "
        "module.densenet121.features.norm0.bias, module.densenet121.features.norm0.running_mean, "
        "module.densenet121.features.norm0.running_var",
        "",
        'against torchvision:densenet121 {"num_classes": 14} (727 tensors):',
        "  this state_dict: block loads every tensor strictly (add it to the member in ensembles.yaml):",
    ]
    assert yaml.safe_load("\n".join(line[4:] for line in lines[13:-1]))["state_dict"] == CHEXNET_RULES
    assert lines[-1] == (
        "  and torch's own loading rules complete it: 121 num_batches_tracked buffers filled with 0 "
        "(saved before PyTorch 0.4.1, as torch's strict loading does)"
    )


def test_inspector_says_what_is_still_missing(folder: Path) -> None:
    published.data_parallel(PoolNet(num_classes=4), folder / "dp.pt")
    report, fits = inspect(folder / "dp.pt", f"{folder}/fixture_models.py:PoolNet", {"num_classes": 3})
    assert not fits
    assert report.splitlines()[-5:] == [
        "  no block loads every tensor; the closest one still leaves 0 missing, 0 unexpected, 2 of another shape",
        "    another shape (2): head.weight: file [4, 8], model [3, 8]; head.bias: file [4], model [3]",
        "    state_dict:",
        "      strip_prefix: ['module.']",
        "  Tensors of another shape mean another architecture: check the member's kwargs (num_classes, width, ...).",
    ]


def test_build_archives_normalized_weights_and_records_the_source(folder: Path, tmp_path: Path) -> None:
    state = original()
    rules = published.lightning(original_module(), folder / "m.ckpt")
    member = {"name": "m", "arch": POOLNET, "kwargs": {"num_classes": 3}, "weights": "m.ckpt", "state_dict": rules}
    parse_member(folder, member)
    spec = load_ensembles(folder / "ensembles.yaml")["e"]
    first = build_archive(spec, tmp_path / "one")
    again = build_archive(spec, tmp_path / "two")
    with zipfile.ZipFile(first) as archive, zipfile.ZipFile(again) as other:
        manifest = json.loads(archive.read("ensemble.json"))
        weights = archive.read("members/m.safetensors")
        assert weights == other.read("members/m.safetensors"), "the same checkpoint archives to the same bytes"
    (tmp_path / "m.safetensors").write_bytes(weights)
    archived = load_file(tmp_path / "m.safetensors")
    assert sorted(archived) == sorted(state) and all(torch.equal(archived[k], state[k]) for k in state)
    assert manifest["sources"] == {"m": {"file": "m.ckpt", "sha256": sha256_of(folder / "m.ckpt"), "state_dict": rules}}
    assert manifest["ensemble"]["members"][0]["weights"] == "members/m.safetensors"
    assert "state_dict" not in manifest["ensemble"]["members"][0]


def resnet(seed: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return layouts.randomize(torchvision.models.resnet18(num_classes=3), seed)


def save_zip(content: Any, path: Path) -> None:
    torch.save(content, path)


def torch_loads(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether torch's own load_state_dict(strict=True) takes `state`: the verdict ours must match."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


RESNET: dict[str, Any] = {"arch": "torchvision:resnet18", "kwargs": {"num_classes": 3}}


@pytest.mark.parametrize(
    "save",
    [
        pytest.param(layouts.save_as_pytorch_03, id="legacy-format-as-pytorch-0.3-wrote-it"),
        pytest.param(save_zip, id="zip-format"),
    ],
)
def test_resnet_saved_without_num_batches_tracked_is_filled_as_torch_fills_it(
    folder: Path, save: Callable[[Any, Path], None]
) -> None:
    module = resnet()
    saved = layouts.as_pytorch_03(nn.DataParallel(module).state_dict())
    save(saved, folder / "r.pt")
    fitted = fit(folder, "r.pt", {"strip_prefix": ["module."]}, **RESNET)
    assert fitted.record() == {"filled": {"num_batches_tracked": 20}}
    assert fitted.filled[:2] == ("bn1.num_batches_tracked", "layer1.0.bn1.num_batches_tracked")
    by_torch = torchvision.models.resnet18(num_classes=3)
    assert torch_loads(by_torch, {key.removeprefix("module."): value for key, value in saved.items()})
    expected = by_torch.state_dict()
    assert list(fitted.state) == list(expected)
    assert all(torch.equal(fitted.state[k], v) and fitted.state[k].dtype == v.dtype for k, v in expected.items())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    loaded = torchvision.models.resnet18(num_classes=3)
    loaded.load_state_dict(fitted.state, strict=True)
    with torch.inference_mode():
        assert torch.equal(loaded.eval()(images), module.eval()(images))


def test_missing_running_mean_stays_an_error_and_filled_buffers_leave_the_counts(folder: Path) -> None:
    saved = layouts.as_pytorch_03(resnet().state_dict())
    del saved["layer2.0.bn1.running_mean"]
    torch.save(saved, folder / "r.pt")
    assert not torch_loads(torchvision.models.resnet18(num_classes=3), dict(saved))
    assert message(folder, "r.pt", {}, **RESNET).splitlines() == [
        (
            "member 'm': r.pt: weights do not fit torchvision:resnet18 (strict loading): 1 missing, 0 unexpected, 0 "
            "of another shape"
        ),
        "  missing (1): layer2.0.bn1.running_mean",
        (
            "  not counted: 20 num_batches_tracked buffers filled with 0 (saved before PyTorch 0.4.1, as torch's "
            "strict loading does)"
        ),
    ]


def test_a_file_whose_metadata_says_the_buffer_exists_is_refused_as_torch_refuses_it(folder: Path) -> None:
    saved = resnet().state_dict()  # Today's state_dict: its _metadata gives every BatchNorm version 2.
    for key in [key for key in saved if key.endswith(".num_batches_tracked")]:
        del saved[key]
    torch.save(saved, folder / "r.pt")
    assert not torch_loads(torchvision.models.resnet18(num_classes=3), torch.load(folder / "r.pt", weights_only=True))
    lines = message(folder, "r.pt", {}, **RESNET).splitlines()
    assert lines[:2] == [
        (
            "member 'm': r.pt: weights do not fit torchvision:resnet18 (strict loading): 20 missing, 0 unexpected, "
            "0 of another shape"
        ),
        (
            "  missing (5 of 20): bn1.num_batches_tracked, layer1.0.bn1.num_batches_tracked, "
            "layer1.0.bn2.num_batches_tracked, layer1.1.bn1.num_batches_tracked, layer1.1.bn2.num_batches_tracked"
        ),
    ]


def test_frozen_batch_norm_drops_the_buffer_it_has_no_place_for_as_torchvision_does(folder: Path) -> None:
    torch.manual_seed(2)
    trained = layouts.randomize(NormNet(num_classes=3), 2)
    torch.save(trained.state_dict(), folder / "n.pt")
    frozen = NormNet(num_classes=3, frozen=True)
    assert torch_loads(frozen, trained.state_dict())
    fitted = fit(folder, "n.pt", {}, arch="fixture_models.py:NormNet", kwargs={"num_classes": 3, "frozen": True})
    assert fitted.record() == {"discarded": {"num_batches_tracked": 1}}
    assert fitted.discarded == ("norm.num_batches_tracked",)
    assert all(torch.equal(fitted.state[k], v) for k, v in frozen.state_dict().items())


def test_build_records_filled_buffers_in_the_source_and_says_so(folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(4)
    layouts.save_as_pytorch_03(
        {"state_dict": layouts.as_pytorch_03(layouts.randomize(NormNet(num_classes=3), 4).state_dict())},
        folder / "n.pth.tar",
    )
    member = {
        "name": "old",
        "arch": "fixture_models.py:NormNet",
        "kwargs": {"num_classes": 3},
        "weights": "n.pth.tar",
        "state_dict": {"key": "state_dict"},
    }
    parse_member(folder, member)
    archive = build_archive(load_ensembles(folder / "ensembles.yaml")["e"], tmp_path / "store")
    with zipfile.ZipFile(archive) as zipped:
        source = json.loads(zipped.read("ensemble.json"))["sources"]["old"]
    assert source == {
        "file": "n.pth.tar",
        "sha256": sha256_of(folder / "n.pth.tar"),
        "state_dict": {"key": "state_dict"},
        "filled": {"num_batches_tracked": 1},
    }
    assert forgiven_lines(archive) == [
        "member 'old': filled 1 num_batches_tracked buffers with 0: its checkpoint predates PyTorch 0.4.1, "
        "and torch's strict loading fills them the same way (recorded in its provenance)"
    ]


def test_a_one_element_vector_loads_into_a_scalar_as_torch_loads_it(folder: Path) -> None:
    """PyTorch before 0.4 had no 0-dim tensors: its scalars were saved as one-element vectors."""
    torch.manual_seed(6)
    saved = layouts.randomize(NormNet(num_classes=3), 6).state_dict()
    saved["norm.num_batches_tracked"] = torch.tensor([5])
    torch.save(dict(saved), folder / "n.pt")
    assert torch_loads(NormNet(num_classes=3), dict(saved))
    loaded = load(folder, "n.pt", {}, arch="fixture_models.py:NormNet")
    assert loaded["norm.num_batches_tracked"].shape == () and loaded["norm.num_batches_tracked"].item() == 5


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        pytest.param("torchvision:resnet18", {"pretrained": True}, id="torchvision-pretrained"),
        pytest.param("torchvision:resnet18", {"weights": "DEFAULT"}, id="torchvision-weights"),
        pytest.param("timm:resnet10t", {"pretrained": True}, id="timm-pretrained"),
        pytest.param("timm:resnet10t", {"checkpoint_path": "r.pt"}, id="timm-checkpoint-path"),
        pytest.param("timm:resnet10t", {"pretrained_cfg_overlay": {"file": "r.pt"}}, id="timm-cfg-overlay"),
    ],
)
def test_zoo_kwargs_that_load_pretrained_weights_are_refused(folder: Path, arch: str, kwargs: dict[str, Any]) -> None:
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), folder / "r.pt")
    zoo = arch.split(":")[0]
    assert message(folder, "r.pt", {}, arch=arch, kwargs={"num_classes": 3, **kwargs}) == (
        f"member 'm': kwargs {sorted(kwargs)} would make {zoo} load pretrained weights; "
        "remove them: a member's weights come only from its `weights:` file"
    )


def test_a_timm_model_loads_the_state_dict_timm_saves_exactly(folder: Path) -> None:
    """`timm:<model>` is built with pretrained=False and takes a checkpoint as timm's own models save it."""
    torch.manual_seed(11)
    published_model = layouts.randomize(timm.create_model("resnet10t", pretrained=False, num_classes=3), 11)
    torch.save(published_model.state_dict(), folder / "resnet10t.pth")
    loaded = load(folder, "resnet10t.pth", {}, arch="timm:resnet10t")
    assert loaded.keys() == published_model.state_dict().keys()
    assert all(torch.equal(loaded[key], value) for key, value in published_model.state_dict().items())


def test_a_detection_builder_gets_no_backbone_download(tmp_path: Path) -> None:
    """torchvision's detection builders default to an ImageNet backbone; offline, fetching it would fail."""
    member = MemberSpec("d", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "x", {"num_classes": 3})
    module = build_member(member, tmp_path)
    assert sum(p.numel() for p in module.parameters()) > 1_000_000
