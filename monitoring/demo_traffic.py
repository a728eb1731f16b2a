"""A bounded mix of traffic to the `make serve` TorchServe, so that `make monitor-report` has something to draw.

Usage: python -m monitoring.demo_traffic [--seconds 180] [--clients 4]   (`make monitor-traffic`)

From `clients` threads, until the deadline, to 127.0.0.1 only: held-out demo images as raw bodies
under several policies, multipart and v2 requests of several images, and a few bad requests (an
undecodable image, an unknown policy), to `shapes` and `multishape`. Prints what it sent.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import requests

from archive_scripts.demo_data import make_split
from archive_scripts.torchserve_ctl import SHIPPED_CONFIG, Server

Request = Callable[[requests.Session, str, dict[str, str]], tuple[str, int]]


def images(count: int) -> list[bytes]:
    """Held-out demo images (a seed training never used), as PNG bytes."""
    encoded = []
    for sample in make_split(count, 777):
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def mix(pool: list[bytes], rng: random.Random) -> Request:
    """One request of the mix: mostly single images under the default and other policies, some batches, a few errors."""
    kind = rng.choices(["raw", "policy", "multipart", "v2", "bad-image", "bad-policy"], weights=[50, 25, 10, 10, 3, 2])[
        0
    ]
    model = rng.choice(["shapes", "shapes", "multishape"])
    url = f"predictions/{model}"

    def send(session: requests.Session, base: str, auth: dict[str, str]) -> tuple[str, int]:
        if kind == "raw":
            response = session.post(
                f"{base}/{url}", data=rng.choice(pool), headers={**auth, "Content-Type": "image/png"}, timeout=60
            )
        elif kind == "policy":
            policy = rng.choice(["any", "all", "mean", "max"])
            headers = {**auth, "Content-Type": "image/png", "X-Ensemble-Policy": policy}
            response = session.post(f"{base}/{url}", data=rng.choice(pool), headers=headers, timeout=60)
        elif kind == "multipart":
            files = [(f"p{i}", image) for i, image in enumerate(rng.sample(pool, 3))]
            response = session.post(f"{base}/{url}", files=files, headers=auth, timeout=60)
        elif kind == "v2":
            data = [base64.b64encode(image).decode() for image in rng.sample(pool, 2)]
            body = {
                "inputs": [{"name": "images", "shape": [2], "datatype": "BYTES", "data": data}],
                "parameters": {"policy": "mean"},
            }
            response = session.post(
                f"{base}/v2/models/{model}/infer",
                data=json.dumps(body),
                headers={**auth, "Content-Type": "application/json"},
                timeout=60,
            )
        elif kind == "bad-image":
            response = session.post(
                f"{base}/{url}", data=b"not an image", headers={**auth, "Content-Type": "image/png"}, timeout=60
            )
        else:
            headers = {**auth, "Content-Type": "image/png", "X-Ensemble-Policy": "vote"}
            response = session.post(f"{base}/{url}", data=rng.choice(pool), headers=headers, timeout=60)
        return f"{model} {kind}", response.status_code

    return send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    server = Server(config=SHIPPED_CONFIG, workdir=SHIPPED_CONFIG.parent)
    if not server.inference.startswith("http://127.0.0.1:"):
        raise SystemExit(f"refusing to send traffic to {server.inference}: only 127.0.0.1")
    auth = server.headers("inference")
    pool = images(64)
    sent: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while time.monotonic() < deadline:
                outcome = mix(pool, rng)(session, server.inference, auth)
                with lock:
                    sent[outcome] += 1

    with ThreadPoolExecutor(args.clients) as threads:
        list(threads.map(client, range(args.clients)))
    for (what, status), count in sorted(sent.items()):
        print(f"{count:6d}  {status}  {what}")


if __name__ == "__main__":
    main()
