"""Shared fixtures: small real ensembles (random but fixed weights) written to a temporary folder."""

from __future__ import annotations

import functools
import gc
import io
import json
import random
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
import torchvision
import ts
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from archive_scripts.build_archives import build_archive
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec, InputSpec, TensorSpec
from handlers.ensemble import Ensemble
from handlers.ensemble_handler import EnsembleHandler
from handlers.inputs.images import decode_image
from tests.checkpoint_layouts import write_chexnet_ensemble
from tests.fixture_models import FaultyMLP, PoolNet, TinyMLP

HERE = Path(__file__).parent
NPY = {"Content-Type": "application/x-npy"}
LABELS = {"multiclass": ["cat", "dog", "fox"], "binary": ["absent", "present"], "multilabel": ["red", "round"]}


def write_ensemble(folder: Path, name: str = "trio", *, task: str = "multiclass", **overrides: Any) -> Path:
    """Write three members' weights and an ensembles.yaml for them; return the yaml path.

    Members: a torchvision mobilenet_v3_small, and two PoolNets from a model file (one RGB, one
    greyscale at another size), so the ensemble has two distinct input specs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fixture_models.py", folder / "fixture_models.py")
    labels = LABELS[task]
    torch.manual_seed(7)
    modules = {
        "mobile": torchvision.models.mobilenet_v3_small(num_classes=len(labels)),
        "pool_rgb": PoolNet(num_classes=len(labels)),
        "pool_gray": PoolNet(num_classes=len(labels), in_channels=1),
    }
    for member, module in modules.items():
        torch.save(module.state_dict(), folder / f"{member}.pt")
    ensemble: dict[str, Any] = {
        "version": "2.1",
        "task": task,
        "labels": labels,
        "input": {"size": [32, 32]},
        "batching": {"batch_size": 8, "max_batch_delay_ms": 300, "workers": 1, "micro_batch_size": 4},
        "members": [
            {
                "name": "mobile",
                "arch": "torchvision:mobilenet_v3_small",
                "kwargs": {"num_classes": len(labels)},
                "weights": "mobile.pt",
            },
            {
                "name": "pool_rgb",
                "arch": "fixture_models.py:PoolNet",
                "kwargs": {"num_classes": len(labels)},
                "weights": "pool_rgb.pt",
                "weight": 2.0,
            },
            {
                "name": "pool_gray",
                "arch": "fixture_models.py:PoolNet",
                "kwargs": {"num_classes": len(labels), "in_channels": 1},
                "weights": "pool_gray.pt",
                "input": {"size": [24, 24], "color_mode": "L"},
            },
        ],
    }
    if task == "binary":
        ensemble["positive_label"] = "present"
    ensemble.update(overrides)
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {name: ensemble}}, sort_keys=False))
    return path


def write_tensor_ensemble(folder: Path, name: str = "vectors") -> Path:
    """Two TinyMLP members over [3, 4] float instances, three labels; return the ensembles.yaml path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fixture_models.py", folder / "fixture_models.py")
    torch.manual_seed(11)
    members = []
    for member, hidden in (("narrow", 8), ("wide", 32)):
        torch.save(TinyMLP(in_features=12, num_classes=3, hidden=hidden).state_dict(), folder / f"{member}.pt")
        kwargs = {"in_features": 12, "num_classes": 3, "hidden": hidden}
        members.append(
            {"name": member, "arch": "fixture_models.py:TinyMLP", "kwargs": kwargs, "weights": f"{member}.pt"}
        )
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": LABELS["multiclass"],
        "input": {"type": "tensor", "shape": [3, 4]},
        "limits": {"max_images_per_request": 16},
        "members": members,
    }
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {name: ensemble}}, sort_keys=False))
    return path


# The faults ensemble's members (tests/fixture_models.py): name -> (arch kwargs beyond the shape, required).
# A member misbehaves only on instances whose first value is its mark.
FAULTY_MEMBERS: dict[str, tuple[dict[str, Any], bool]] = {
    "steady": ({"hidden": 8}, True),
    "calm": ({"hidden": 24}, False),
    "slow": ({"fault": "sleep", "mark": 1.0, "seconds": 0.6}, False),
    "broken": ({"fault": "raise", "mark": 2.0}, False),
    "nan": ({"fault": "nan", "mark": 3.0}, False),
    "stiff": ({"fault": "sleep", "mark": 4.0, "seconds": 0.6}, True),
    "hang": ({"fault": "sleep", "mark": 5.0, "seconds": 3600.0}, False),
}


def write_fault_ensemble(
    folder: Path, name: str = "faults", *, seconds: dict[str, float] | None = None, **overrides: Any
) -> Path:
    """Seven members over [3, 4] float instances, three labels, policy majority, each member on eager: two that
    always answer and five that misbehave on marked instances (FAULTY_MEMBERS; `seconds` changes how long a
    sleeping member sleeps); return the ensembles.yaml path."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "fixture_models.py", folder / "fixture_models.py")
    torch.manual_seed(23)
    members = []
    for member, (extra, required) in FAULTY_MEMBERS.items():
        kwargs = {"in_features": 12, "num_classes": 3, **extra}
        if seconds and member in seconds:
            kwargs["seconds"] = seconds[member]
        model = FaultyMLP(**kwargs) if "fault" in extra else TinyMLP(**kwargs)
        torch.save(model.state_dict(), folder / f"{member}.pt")
        arch = "fixture_models.py:FaultyMLP" if "fault" in extra else "fixture_models.py:TinyMLP"
        members.append(
            {"name": member, "arch": arch, "kwargs": kwargs, "weights": f"{member}.pt", "required": required}
        )
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": LABELS["multiclass"],
        "policy": {"name": "majority"},
        "input": {"type": "tensor", "shape": [3, 4]},
        "limits": {"max_images_per_request": 16},
        "execution": {"plan": "eager"},
        "batching": {"batch_size": 8, "max_batch_delay_ms": 2, "response_timeout_s": 10},
        "deadline": {"stuck_after_s": 2},
        "members": members,
        **overrides,
    }
    path = folder / "ensembles.yaml"
    path.write_text(yaml.safe_dump({"ensembles": {name: ensemble}}, sort_keys=False))
    return path


def marked(seed: int, count: int, marks: dict[int, float]) -> numpy.ndarray:
    """`instances(seed, count)` with instance i's first value set to marks[i] (a member's fault mark)."""
    values = instances(seed, count)
    for i, mark in marks.items():
        values[i, 0, 0] = mark
    return values


def npy_bytes(values: Any) -> bytes:
    """An array (anything numpy.asarray takes) saved as a .npy file."""
    buffer = io.BytesIO()
    numpy.save(buffer, numpy.asarray(values), allow_pickle=False)
    return buffer.getvalue()


def instances(seed: int, count: int) -> numpy.ndarray:
    """`count` reproducible float32 instances of shape [3, 4]."""
    return numpy.random.default_rng(seed).standard_normal((count, 3, 4)).astype(numpy.float32)


def image_bytes(seed: int, *, size: tuple[int, int] = (40, 30), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A reproducible random image, encoded."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def ensemble_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a test ensemble into tmp_path and return its ensembles.yaml."""
    return lambda **kw: write_ensemble(tmp_path / "ensemble", **kw)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's built archives (`test_store`) is slow: building them takes tens of seconds."""
    for item in items:
        if "test_store" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


TEST_ENSEMBLES: dict[str, dict[str, Any]] = {
    "trio": {"task": "multiclass"},
    "pair": {"task": "binary", "policy": {"name": "majority"}},
    "tags": {"task": "multilabel", "policy": {"name": "any", "threshold": 0.5}},
}


@pytest.fixture(scope="session")
def test_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding trio.mar (multiclass), pair.mar (binary), tags.mar (multilabel), vectors.mar (tensors)
    and chexnet.mar (a DenseNet121 from CheXNet's published checkpoint layout, through state_dict: rules).

    Built once per session with the real build script and torch-model-archiver.
    """
    root = tmp_path_factory.mktemp("store")
    for name, overrides in TEST_ENSEMBLES.items():
        spec = load_ensembles(write_ensemble(root / "src" / name, name, **overrides))[name]
        build_archive(spec, root / "model_store")
    build_archive(load_ensembles(write_tensor_ensemble(root / "src" / "vectors"))["vectors"], root / "model_store")
    build_archive(load_ensembles(write_chexnet_ensemble(root / "src" / "chexnet"))["chexnet"], root / "model_store")
    return root / "model_store"


def extract(store: Path, name: str, into: Path) -> Path:
    """A test archive unpacked as TorchServe unpacks it into a model directory."""
    with zipfile.ZipFile(store / f"{name}.mar") as archive:
        archive.extractall(into)
    return into


def source_spec(store: Path, name: str) -> EnsembleSpec:
    """The EnsembleSpec a test archive was built from (with its weights on disk)."""
    return load_ensembles(store.parent / "src" / name / "ensembles.yaml")[name]


def image_input(given: InputSpec | TensorSpec) -> InputSpec:
    """An image ensemble's (or image member's) input spec, narrowed from the union: a TensorSpec fails here."""
    assert isinstance(given, InputSpec), given
    return given


@functools.cache
def reference_ensemble(store: Path, name: str) -> Ensemble:
    """The test ensemble loaded in-process from its source files, once per session, every member on eager."""
    return Ensemble.from_spec(source_spec(store, name).with_plan("eager"), torch.device("cpu"))


def reference(store: Path, name: str, images: list[bytes], **policy: str) -> list[dict[str, Any]]:
    """In-process predictions of the same members on the same images, through no HTTP and no archive.

    This runs the server's own code (Ensemble.prepare/probabilities/render), so it only checks that a transport
    (HTTP, gRPC, the gateway) answers what the library answers: a consistency check, never an expectation. What
    an answer should be comes from tests/fixture_reference.py (the members' own modules and docs/policies.md).
    """
    ensemble = reference_ensemble(store, name)
    prepared = ensemble.prepare({"body": images[0], **{k: v.encode() for k, v in policy.items()}}, {})
    probs = ensemble.probabilities([decode_image(data, ensemble.spec.limits) for data in images])
    return ensemble.render(probs, prepared.policy, members=_names(ensemble, prepared.members))["predictions"]


def _names(ensemble: Ensemble, positions: tuple[int, ...]) -> list[str]:
    return [ensemble.spec.members[m].name for m in positions]


def _labels_and_scores(view: dict[str, Any]) -> tuple[Any, list[float | None]]:
    if "labels" in view:
        return view["labels"], list(view["scores"].values())
    return view["label"], [view["score"]]


def assert_same_predictions(served: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Labels equal exactly; scores within 1e-4 of eager: the limit every execution plan is verified against.

    For consistency checks between two runs of the server's code (`reference`, tests/test_consistency.py).
    """
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        views = [(got, want)] + [(got["members"][m], want["members"][m]) for m in want["members"]]
        assert list(got["members"]) == list(want["members"])
        for got_view, want_view in views:
            got_labels, got_scores = _labels_and_scores(got_view)
            want_labels, want_scores = _labels_and_scores(want_view)
            assert got_labels == want_labels
            assert [s is None for s in got_scores] == [s is None for s in want_scores]
            assert [s for s in got_scores if s is not None] == pytest.approx(
                [s for s in want_scores if s is not None], abs=1e-4
            )


def make_context(model_dir: Path, name: str, metrics_config: Path | None = None) -> Context:
    """TorchServe's own Context for an extracted archive, with a metrics cache (TorchServe's default config unless
    given)."""
    config = metrics_config or Path(ts.__file__).parent / "configs" / "metrics.yaml"
    with warnings.catch_warnings():
        # TorchServe 0.12 reads the config with yaml.safe_load(open(path)) and never closes the file.
        warnings.simplefilter("ignore", ResourceWarning)
        metrics = MetricsCacheYamlImpl(config_file_path=str(config))
        metrics.initialize_cache()
        gc.collect()
    return Context(name, str(model_dir), {}, 8, None, "0.12.0", metrics=metrics)


def load_handler(
    store: Path, name: str, folder: Path, metrics_config: Path | None = None
) -> tuple[EnsembleHandler, Context]:
    """A test archive unpacked into `folder` and loaded by the real handler, as a TorchServe worker loads it."""
    context = make_context(extract(store, name, folder), name, metrics_config)
    handler = EnsembleHandler()
    handler.initialize(context)
    return handler, context


def serve(handler: EnsembleHandler, context: Context, requests: list[tuple[dict[str, Any], dict[str, Any]]]) -> list:
    """Run one TorchServe batch through handle(); return (status, body, headers) per request."""
    context.request_processor = [RequestProcessor(headers) for _, headers in requests]
    bodies = handler.handle([row for row, _ in requests], context)
    return [
        (context.get_response_status(i)[0], json.loads(body), context.get_response_headers(i))
        for i, body in enumerate(bodies)
    ]
