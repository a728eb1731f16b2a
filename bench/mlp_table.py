"""The paper table: an EMNIST-sized MLP served by us and by Flask, one client thread, no concurrency.

Usage: python -m bench.mlp_table [--quick]   (`make bench-mlp`)

As in the article (`../shared/seeds/exploration-to-production-part2.md`), one client thread sends
requests back to back for a fixed time and counts requests per second, with 1 and with 128
instances per request. Contenders, one at a time on the same instances and cores: our TorchServe
ensemble taking `application/x-npy` and taking JSON, and the Flask + gunicorn baseline taking JSON
(its natural form) and `.npy` (to separate the format from the server). Every answer is checked
against the in-process labels. Each contender's transport floor is measured too: requests/s of a body
it refuses at once (an image sent to a tensor ensemble), i.e. HTTP and the worker round trip with
no model. Writes bench/results/mlp.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import numpy
import requests
import torch
import yaml

from bench.archived import every_member
from bench.contenders import TIMEOUT_S, Setup, extracted_archive, gunicorn, serving
from bench.emnist_mlp import EmnistMLP
from handlers.config.files import load_ensembles
from handlers.config.specs import EnsembleSpec
from handlers.ensemble import Ensemble

RESULTS = Path(__file__).parent / "results" / "mlp.json"
SIZES = (1, 128)
NAME = "emnist"


@dataclass(frozen=True)
class Encoding:
    """How a request body carries instances."""

    content_type: str
    encode: Callable[[numpy.ndarray], bytes]


def _npy(values: numpy.ndarray) -> bytes:
    buffer = io.BytesIO()
    numpy.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


ENCODINGS = {
    "npy": Encoding("application/x-npy", _npy),
    "json": Encoding("application/json", lambda values: json.dumps({"instances": values.tolist()}).encode()),
}


def write_workload(folder: Path) -> EnsembleSpec:
    """One EmnistMLP member with fixed random weights, tensor input [784], 62 labels, batch size 1."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).parent / "emnist_mlp.py", folder / "emnist_mlp.py")
    torch.manual_seed(0)
    torch.save(EmnistMLP().state_dict(), folder / "mlp.pt")
    ensemble = {
        "version": "1.0",
        "task": "multiclass",
        "labels": [f"class{i}" for i in range(62)],
        "input": {"type": "tensor", "shape": [784]},
        "limits": {"max_images_per_request": 128},
        "batching": {"batch_size": 1, "max_batch_delay_ms": 1, "workers": 1},
        "members": [{"name": "mlp", "arch": "emnist_mlp.py:EmnistMLP", "weights": "mlp.pt"}],
    }
    (folder / "ensembles.yaml").write_text(yaml.safe_dump({"ensembles": {NAME: ensemble}}))
    return load_ensembles(folder / "ensembles.yaml")[NAME]


def single_client(
    url: str, headers: dict[str, str], body: bytes, expected: list[str], *, seconds: float, limit: int
) -> dict[str, float | int]:
    """Back-to-back requests from one thread for `seconds` (at most `limit`); count those answered right."""
    session = requests.Session()
    ok = errors = mismatches = 0
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds and ok + errors + mismatches < limit:
        try:
            response = session.post(url, data=body, headers=headers, timeout=TIMEOUT_S)
            response.raise_for_status()
            labels = response.json()["members"]["mlp"]
        except (requests.RequestException, ValueError, KeyError):
            errors += 1
            continue
        if labels == expected:
            ok += 1
        else:
            mismatches += 1
    wall = time.perf_counter() - begin
    session.close()
    return {
        "requests_per_s": ok / wall,
        "requests": ok + errors + mismatches,
        "errors": errors,
        "mismatches": mismatches,
    }


def floor(url: str, headers: dict[str, str], *, seconds: float) -> dict[str, float | int]:
    """Requests/s of the cheapest answer a contender gives: the cost of its transport alone."""
    session = requests.Session()
    count = 0
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds and count < 100_000:
        session.post(url, data=b"\x89PNG", headers=headers, timeout=TIMEOUT_S)
        count += 1
    wall = time.perf_counter() - begin
    session.close()
    return {"requests_per_s": count / wall, "requests": count}


@contextmanager
def ours(spec: EnsembleSpec) -> Iterator[tuple[str, dict[str, str]]]:
    """The MLP ensemble .mar on a private TorchServe: its predictions URL and token header."""
    with serving([spec]) as server:
        yield f"{server.inference}/predictions/{NAME}", server.headers("inference")


@contextmanager
def flask(spec: EnsembleSpec) -> Iterator[tuple[str, dict[str, str]]]:
    """The same ensemble in the Flask + gunicorn baseline (2 workers, members eager)."""
    with extracted_archive(spec) as model_dir, gunicorn(model_dir, every_member(spec, "eager"), Setup(units=2)) as url:
        yield url, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per cell instead of 10 s")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else 10.0
    began = time.perf_counter()
    rng = numpy.random.default_rng(2024)
    batches = {n: rng.random((n, 784), dtype=numpy.float32) for n in SIZES}
    results: dict[str, dict[str, float | int]] = {}
    floors: dict[str, dict[str, float | int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mlp-") as folder:
        spec = write_workload(Path(folder))
        reference = Ensemble.from_spec(spec, torch.device("cpu"))
        expected = {
            n: reference.render(reference.probabilities(torch.from_numpy(values)), spec.policy)["members"]["mlp"]
            for n, values in batches.items()
        }
        contenders = {"ours": lambda: ours(spec), "flask": lambda: flask(spec)}
        for contender, serve in contenders.items():
            with serve() as (url, headers):
                floors[contender] = floor(url, {**headers, "Content-Type": "image/png"}, seconds=seconds / 2)
                print(f"  {contender} transport floor: {floors[contender]['requests_per_s']:8.1f} req/s", flush=True)
                for encoding_name, encoding in ENCODINGS.items():
                    for n, values in batches.items():
                        body = encoding.encode(values)
                        send_headers = {**headers, "Content-Type": encoding.content_type}
                        single_client(url, send_headers, body, expected[n], seconds=0.5, limit=200)
                        cell = single_client(url, send_headers, body, expected[n], seconds=seconds, limit=100_000)
                        results[f"{contender}-{encoding_name}/{n}"] = cell
                        print(
                            f"  {contender} {encoding_name:4} x{n:<3}: {cell['requests_per_s']:8.1f} req/s", flush=True
                        )
    table, data = report(results)
    print(table)
    print(
        "transport floor (an image sent to the tensor ensemble, answered 4xx at once): "
        + ", ".join(f"{name} {cell['requests_per_s']:.0f} req/s" for name, cell in floors.items())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "quick": args.quick,
                "seconds_per_cell": seconds,
                "machine": {"cores": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
                "versions": {pkg: version(pkg) for pkg in ("torch", "torchserve", "flask", "gunicorn")},
                "cells": data,
                "transport_floor": floors,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS} in {time.perf_counter() - began:.0f}s")


def report(results: dict[str, dict[str, float | int]]) -> tuple[str, dict[str, dict[str, float | int]]]:
    """A markdown table, with each of ours against Flask on JSON (the article's baseline)."""
    lines = [
        "| contender | instances per request | req/s | instances/s | errors | mismatches | vs flask-json |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    data = {}
    for key, cell in results.items():
        contender, n = key.split("/")
        baseline = results[f"flask-json/{n}"]["requests_per_s"]
        row = {**cell, "ratio_vs_flask_json": cell["requests_per_s"] / baseline}
        data[key] = row
        lines.append(
            f"| {contender} | {n} | {row['requests_per_s']:.1f} | {row['requests_per_s'] * int(n):.0f} | "
            f"{row['errors']} | {row['mismatches']} | {row['ratio_vs_flask_json']:.2f}x |"
        )
    return "\n".join(lines), data


if __name__ == "__main__":
    main()
