"""`consistency: batch_invariant`: an image's answer is bit-identical whatever shares its batch, and whatever the
load."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import Server, private_server, register, start, stop
from handlers.config.files import load_ensembles
from handlers.ensemble import Ensemble
from handlers.inputs.images import decode_image
from tests.conftest import assert_same_predictions, image_bytes, write_ensemble

# Times plans and compares bits across batch positions and thread counts: seconds per test.
pytestmark = pytest.mark.slow

TIMEOUT = 60
TARGET = image_bytes(71, size=(45, 38))
NEIGHBOURS = [image_bytes(seed, size=(30 + seed % 20, 40)) for seed in range(100, 124)]


def steady_yaml(folder: Path, **overrides: Any) -> Path:
    """The test trio with batch-invariant answers, and hflip views on every member."""
    path = write_ensemble(folder, "steady", consistency="batch_invariant", **overrides)
    doc = yaml.safe_load(path.read_text())
    doc["ensembles"]["steady"]["input"]["tta"] = "hflip"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("plan", ["auto", "eager"], ids=str)
@pytest.mark.parametrize("parallelism", [1, 2], ids=lambda p: f"threads{p}")
def test_an_image_scores_the_same_bits_at_every_position_among_any_neighbours(
    tmp_path: Path, plan: str, parallelism: int
) -> None:
    spec = load_ensembles(steady_yaml(tmp_path))["steady"]
    spec = spec if plan == "auto" else spec.with_plan(plan)
    ensemble = Ensemble.from_spec(spec, torch.device("cpu"), parallelism=parallelism)
    limits = ensemble.spec.limits
    target = decode_image(TARGET, limits)
    neighbours = [decode_image(data, limits) for data in NEIGHBOURS]
    alone = ensemble.probabilities([target])[:, 0]
    for count, position in ((2, 0), (2, 1), (5, 3), (8, 7), (13, 6)):
        batch = neighbours[: count - 1]
        batch.insert(position, target)
        assert torch.equal(ensemble.probabilities(batch)[:, position], alone), (count, position)


@pytest.mark.parametrize(
    ("consistency", "rows"), [("batch_invariant", ["1"]), ("fast", ["2", "4"])], ids=["batch-invariant", "fast"]
)
def test_plans_are_timed_at_the_rows_per_call_the_worker_runs(
    tmp_path: Path, consistency: str, rows: list[str]
) -> None:
    spec = load_ensembles(steady_yaml(tmp_path))["steady"]
    ensemble = Ensemble.from_spec(replace(spec, consistency=consistency), torch.device("cpu"), parallelism=2)
    timed = [sizes for choice in ensemble.plan_choices().values() for sizes in choice["ms_per_call"].values()]
    assert timed and all(list(sizes) == rows for sizes in timed)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("steady")
    batching = {"batch_size": 8, "max_batch_delay_ms": 50, "workers": 2, "micro_batch_size": 4}
    source = steady_yaml(root / "src", batching=batching)
    store = root / "model_store"
    build_archive(load_ensembles(source)["steady"], store)
    instance = private_server(root / "torchserve", store, port_offset=10800)
    try:
        start(instance, store)
        register(instance, "steady", workers=2)
        yield instance, source
    finally:
        stop(instance)


def test_the_same_image_alone_and_amid_neighbours_at_concurrency_gets_byte_identical_json(
    server: tuple[Server, Path],
) -> None:
    instance, source = server
    shuffle = random.Random(5)
    requests_to_send: list[tuple[list[bytes], int]] = [([TARGET], 0)] * 4
    for _ in range(24):
        count = shuffle.randint(2, 4)
        images = shuffle.sample(NEIGHBOURS, count - 1)
        position = shuffle.randrange(count)
        images.insert(position, TARGET)
        requests_to_send.append((images, position))

    def send(job: tuple[list[bytes], int]) -> tuple[str, int]:
        images, position = job
        files = [(f"image{i}", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
        url = f"{instance.inference}/predictions/steady"
        response = requests.post(url, files=files, headers=instance.headers("inference"), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        body = response.json()
        answer = {
            "prediction": body["predictions"][position],
            "provenance": body["provenance"],
            "answered_by": body["answered_by"],
        }
        return json.dumps(answer), int(response.headers["X-Ensemble-Batch-Images"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, requests_to_send))
    assert len({text for text, _ in answers}) == 1
    assert max(images for _, images in answers) > 4, "no batch merged requests: the neighbours never shared a batch"
    reference = Ensemble.from_spec(load_ensembles(source)["steady"].with_plan("eager"), torch.device("cpu"))
    probs = reference.probabilities([decode_image(TARGET, reference.spec.limits)])
    assert_same_predictions(
        [json.loads(answers[0][0])["prediction"]], reference.render(probs, reference.spec.policy)["predictions"]
    )
