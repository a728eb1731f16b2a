"""The per-request floor: where one small request's time goes, on TorchServe (ours) and on Flask, and which \
settings cut it.

Usage: python -m bench.request_floor [--seconds S]   (`make bench-floor`)

One client thread sends the paper table's one-instance MLP request (`.npy`, see bench/mlp_table.py)
back to back, as in `make bench-mlp`. For each contender it reports requests/s, wall ms per request, and
the CPU ms each process spent per request: the client (this process), TorchServe's Java frontend and
its Python worker, or gunicorn's processes. Ours runs once per frontend setting in VARIANTS (the shipped
config.properties first, then each change on top of it), all in this one invocation, twice each,
interleaved, so a setting is compared only with runs on the same machine minutes apart.
Writes bench/results/request_floor.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy
import psutil
import requests

from archive_scripts.build_archives import build_archive
from archive_scripts.torchserve_ctl import private_server, register, start, stop
from bench.archived import every_member
from bench.contenders import Setup, extracted_archive, gunicorn
from bench.cpu_profile import cpu_s
from bench.mlp_table import NAME, _npy, single_client, write_workload

RESULTS = Path(__file__).parent / "results" / "request_floor.json"
NPY = {"Content-Type": "application/x-npy"}
# Frontend settings tried on top of the shipped config.properties (each a dict of overrides); a JVM
# without vmargs is TorchServe's default: G1 and tiered C1 + C2 compilation.
VARIANTS: dict[str, dict[str, str]] = {
    "shipped (serial GC, C1 only)": {},
    "JVM defaults (G1, C2)": {"vmargs": ""},
    "serial GC, C2": {"vmargs": "-XX:+UseSerialGC"},
    "shipped + 1 netty thread": {"netty_threads": "1", "netty_client_threads": "1"},
}


def profile(
    url: str,
    headers: dict[str, str],
    body: bytes,
    expected: list[str],
    processes: dict[str, list[psutil.Process]],
    seconds: float,
) -> dict[str, float]:
    """Requests/s, wall ms and CPU ms per request by process, for `seconds` of back-to-back requests."""
    single_client(url, headers, body, expected, seconds=1.0, limit=500)
    processes = {"client": [psutil.Process()], **processes}
    before = {name: sum(map(cpu_s, group)) for name, group in processes.items()}
    cell = single_client(url, headers, body, expected, seconds=seconds, limit=100_000)
    answered = cell["requests"] - cell["errors"] - cell["mismatches"]
    row = {"requests_per_s": cell["requests_per_s"], "errors": cell["errors"], "mismatches": cell["mismatches"]}
    row["wall_ms"] = 1000 / cell["requests_per_s"] if cell["requests_per_s"] else float("nan")
    for name, group in processes.items():
        row[f"{name}_cpu_ms"] = 1000 * (sum(map(cpu_s, group)) - before[name]) / max(answered, 1)
    return row


@contextmanager
def ours(
    folder: Path, store: Path, overrides: dict[str, str], tag: str, ports: int
) -> Iterator[tuple[str, dict[str, str], dict[str, list[psutil.Process]]]]:
    """Our MLP ensemble on a private TorchServe with `overrides`.

    Its own ports, so a stopping instance never collides.
    """
    server = private_server(folder / tag, store, port_offset=ports, overrides=overrides)
    try:
        start(server, store)
        register(server, NAME, 1)
        models = requests.get(
            f"{server.management}/models/{NAME}", headers=server.headers("management"), timeout=30
        ).json()
        worker = psutil.Process(int(models[0]["workers"][0]["pid"]))
        [frontend] = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "org.pytorch.serve.ModelServer" in " ".join(p.info["cmdline"] or [])
        ]
        yield (
            f"{server.inference}/predictions/{NAME}",
            {**server.headers("inference"), **NPY},
            {"frontend": [frontend], "worker": [worker]},
        )
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per measurement")
    args = parser.parse_args()
    began = time.perf_counter()
    body = _npy(numpy.random.default_rng(2024).random((1, 784), dtype=numpy.float32))
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as folder:
        spec = write_workload(Path(folder) / "workload")
        store = Path(folder) / "store"
        build_archive(spec, store)
        for round_number in range(2):
            with (
                extracted_archive(spec) as model_dir,
                gunicorn(model_dir, every_member(spec, "eager"), Setup(units=2)) as url,
            ):
                expected = requests.post(url, data=body, headers=NPY, timeout=30).json()["members"]["mlp"]
                parent = psutil.Process(
                    next(
                        p.pid
                        for p in psutil.process_iter(["cmdline"])
                        if "bench.flask_server:create_app()" in " ".join(p.info["cmdline"] or []) and p.children()
                    )
                )
                rows.setdefault("Flask + gunicorn", []).append(
                    profile(url, NPY, body, expected, {"server": [parent, *parent.children()]}, args.seconds)
                )
            for index, (name, overrides) in enumerate(VARIANTS.items()):
                tag, ports = f"variant{index}-{round_number}", 32100 + 10 * (len(VARIANTS) * round_number + index)
                with ours(Path(folder), store, overrides, tag, ports) as (url, headers, processes):
                    rows.setdefault(f"ours, {name}", []).append(
                        profile(url, headers, body, expected, processes, args.seconds)
                    )
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{n} {r[-1]['requests_per_s']:.0f} req/s" for n, r in rows.items()),
                flush=True,
            )
    summary = {name: {key: statistics.mean(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    flask = summary["Flask + gunicorn"]["requests_per_s"]
    lines = [
        "| contender | req/s | vs Flask | wall ms | client CPU ms | frontend (Java) CPU ms | worker (Python) CPU ms "
        "| Flask server CPU ms | errors | mismatches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        cpu = [
            f"{row[key]:.2f}" if key in row else ""
            for key in ("client_cpu_ms", "frontend_cpu_ms", "worker_cpu_ms", "server_cpu_ms")
        ]
        lines.append(
            f"| {name} | {row['requests_per_s']:.0f} | {row['requests_per_s'] / flask:.2f}x | {row['wall_ms']:.2f} | "
            + " | ".join(cpu)
            + f" | {row['errors']:.0f} | {row['mismatches']:.0f} |"
        )
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds_per_measurement": args.seconds,
                "seconds": round(time.perf_counter() - began, 1),
                "runs": rows,
                "mean": summary,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
