"""Property tests: arbitrary bytes and parameters raise only our documented errors, in bounded time and memory.

Each property runs a few hundred generated examples with a per-example deadline; decoding a fixed corpus of
such bytes again and again must not grow this process's memory.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
import warnings
from datetime import timedelta

import psutil
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.answers.policies import Votes, combine, member_votes
from handlers.config.policy import TASKS, resolve_policy
from handlers.config.specs import Limits, TensorSpec
from handlers.errors import InvalidImage, InvalidPolicy, PayloadTooLarge, RequestError
from handlers.inputs.images import decode_image
from handlers.inputs.requests import read_request
from handlers.inputs.tensors import read_json_instances, read_npy
from tests.conftest import image_bytes, instances, npy_bytes

LIMITS = Limits(
    max_images_per_request=4, max_image_pixels=1_000_000, formats=("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
)
FAST = settings(max_examples=300, deadline=timedelta(milliseconds=500), suppress_health_check=[HealthCheck.too_slow])
TRACED_GROWTH_LIMIT_KB = 256  # Python objects; about 40 KB without a leak
RSS_GROWTH_LIMIT_MB = 4  # the whole process, C allocations (Pillow's) included; about 0.5 MB without a leak
SEEDS = [image_bytes(1, size=(24, 16), fmt=fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]


def rss_mb() -> float:
    """This process's resident memory now (not its peak, which earlier tests have already raised)."""
    return psutil.Process().memory_info().rss / 2**20


def check_decode(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS)
    except (InvalidImage, PayloadTooLarge):
        return
    assert image.mode in ("RGB", "L")
    assert image.width * image.height <= LIMITS.max_image_pixels


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid encoded image with some bytes overwritten and maybe truncated: it gets past the magic number."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@FAST
@given(st.binary(max_size=4096))
def test_decode_of_arbitrary_bytes_raises_only_our_errors(data: bytes) -> None:
    check_decode(data)


@FAST
@given(mutated_images())
def test_decode_of_corrupted_images_raises_only_our_errors(data: bytes) -> None:
    check_decode(data)


def corrupt_corpus(seed: int, count: int) -> list[bytes]:
    """What the two decode properties generate, from a seeded generator: random bytes, and mutated, truncated images."""
    rng = random.Random(seed)
    corpus = []
    for i in range(count):
        if i % 2:
            corpus.append(rng.randbytes(rng.randint(1, 4096)))
            continue
        data = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        corpus.append(bytes(data[: rng.randint(1, len(data))]))
    return corpus


def test_decoding_corrupt_bytes_again_and_again_does_not_grow_memory() -> None:
    """After a warm-up pass, 5 more passes over 1000 inputs (5000 decodes) must leave memory where it was: a leak
    of a 1 KB buffer per decode (5 MB) fails both bounds, holding on to ~50 bytes of Python objects per decode the
    first."""
    corpus = corrupt_corpus(0, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on some corrupt files; each warning is kept once per location.
        for data in corpus:
            check_decode(data)
        gc.collect()
        tracemalloc.start()
        try:
            rss_before, traced_before = rss_mb(), tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                for data in corpus:
                    check_decode(data)
            gc.collect()
            rss_growth_mb, traced_growth_kb = (
                rss_mb() - rss_before,
                (tracemalloc.get_traced_memory()[0] - traced_before) / 1024,
            )
        finally:
            tracemalloc.stop()
    assert traced_growth_kb < TRACED_GROWTH_LIMIT_KB
    assert rss_growth_mb < RSS_GROWTH_LIMIT_MB


TEXT_OR_BYTES = st.one_of(st.binary(max_size=64), st.text(max_size=16))
HEADER_NAMES = st.sampled_from(
    ["Content-Type", "Content-Length", "X-Ensemble-Policy", "X-Ensemble-K", "X-Ensemble-Threshold", "X-Other"]
)
CONTENT_TYPES = st.sampled_from(["image/png", "application/json", "multipart/form-data; boundary=x", "text/plain", ""])


@FAST
@given(
    st.dictionaries(st.sampled_from(["body", "policy", "k", "threshold", "a", "b"]), TEXT_OR_BYTES, max_size=5),
    st.dictionaries(HEADER_NAMES, st.one_of(st.text(max_size=12), CONTENT_TYPES), max_size=4),
)
def test_parse_request_raises_only_request_errors(row: dict[str, object], headers: dict[str, str]) -> None:
    try:
        parsed = read_request(row, headers, LIMITS, ())
    except RequestError:
        return
    assert 1 <= len(parsed.inputs) <= LIMITS.max_images_per_request


@FAST
@given(
    st.one_of(
        st.binary(max_size=512),
        st.builds(
            lambda head, tail: npy_bytes(instances(0, 2))[:head] + tail, st.integers(0, 200), st.binary(max_size=64)
        ),
    )
)
def test_read_npy_raises_only_request_errors(data: bytes) -> None:
    try:
        values = read_npy(data, TensorSpec(shape=(3, 4)), LIMITS)
    except RequestError:
        return
    assert values.shape[1:] == (3, 4) and values.dtype == torch.float32


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=9), inner, max_size=3),
    max_leaves=40,
)


@FAST
@given(st.one_of(JSON_VALUES, st.builds(lambda value: {"instances": value}, JSON_VALUES)))
def test_read_json_instances_raises_only_request_errors(doc: object) -> None:
    try:
        values = read_json_instances(doc, TensorSpec(shape=(2,)), LIMITS)
    except RequestError:
        return
    assert values.shape[1:] == (2,) and bool(torch.isfinite(values).all())


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["policy", "k", "threshold", "colour"]),
        st.one_of(
            st.text(max_size=8),
            st.sampled_from(["mean", "any", "all", "majority", "k_of_n", "max", "1", "2", "0.5", "nan", "-1"]),
        ),
    ),
    st.sampled_from(TASKS),
    st.integers(1, 5),
    st.data(),
)
def test_policies_raise_only_invalid_policy_and_decide_every_image(
    requested: dict[str, str], task: str, n_members: int, data: st.DataObject
) -> None:
    try:
        policy = resolve_policy(requested, default=None, task=task, n_members=n_members)
    except InvalidPolicy:
        return
    labels = 2 if task == "binary" else data.draw(st.integers(1 if task == "multilabel" else 2, 5))
    images = data.draw(st.integers(1, 4))
    probs = torch.rand(
        n_members,
        images,
        labels,
        generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16))),
        dtype=torch.float64,
    )
    if task != "multilabel":
        probs = probs / probs.sum(dim=-1, keepdim=True)
    votes = Votes(
        task=task,
        weights=torch.ones(n_members, dtype=torch.float64),
        positive=1 if task == "binary" else None,
        policy=policy,
    )
    decision = combine(probs, votes)
    assert decision.chosen.shape == decision.score.shape == (images, labels)
    assert member_votes(probs, votes).shape == (n_members, images, labels)
    assert bool(((decision.score >= 0) & (decision.score <= 1)).all())
