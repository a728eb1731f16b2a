"""The docs' examples, run: every marked example in README.md and docs/ against a real TorchServe serving the demos.

The convention (docs/layout.md, "Tested examples"): `<!-- example: NAME -->` right before a code block
marks it, and the next code block, folded under an admonition or not, is what it prints;
`<!-- example: NAME; output: none -->` prints nothing; `; after: OTHER` runs OTHER first in the same
folder; `<!-- not tested: REASON -->` marks an example the demos cannot answer. A shown output matches
what the example printed when it has the same keys, strings and integers, and every other number within
TOLERANCE; digests and timestamps, which change with every build, stand for any digest and timestamp.
One TorchServe (with its v2 gateway) serves the four demos for the whole module, with the shipped settings
and the real token; only its ports differ, and the examples' addresses are rewritten to them.

`RECORD_EXAMPLES=1` re-records: every value an example printed differently from its page (a score, a label)
replaces the shown one in place, layout kept; a shown digest or timestamp stays. Keys and item counts are
not rewritten: those still fail. Read the diff: the prose around an example may describe its answer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from archive_scripts.torchserve_ctl import SHIPPED_CONFIG, Server, private_server, register, start, stop
from handlers.config.files import read_properties

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DEMOS = ("shapes", "multishape", "faces", "digits")
TOLERANCE = 1e-3
RUN_TIMEOUT_S = 180
MARK = re.compile(r"<!-- example: (?P<name>[\w-]+)(?P<options>(?:; \w+: [\w-]+)*) -->")
NOT_TESTED = re.compile(r"<!-- not tested: [^>]+ -->")
FENCE = re.compile(r"(?P<indent> *)(?P<fence>`{3,})(?P<language>\w*)\s*$")
ADMONITION = re.compile(r" *(\?\?\?\+?|!!!) ")
DIGEST = re.compile(r"[0-9a-f]{64}")
SHOWN_DIGEST = re.compile(r"[0-9a-f]{64}|[0-9a-f]{8,63}…")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\w+|\S')
TOKEN = re.compile(r"""(?P<quoted>'[^']*'|"[^"]*")|(?P<number>[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?)|\w+|\S""")


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page: where it starts, its language, its code (dedented) and the line before it."""

    where: str
    language: str
    code: str
    before: str
    gap: tuple[str, ...]
    lines: tuple[int, int] = (0, 0)
    indent: int = 0


@dataclass(frozen=True)
class Example:
    """A marked example: the code to run and the output the page shows (None: it prints nothing)."""

    name: str
    where: str
    language: str
    code: str
    output: str | None
    after: str | None
    output_block: Block | None = None


def blocks(text: str, page: str) -> list[Block]:
    """Every fenced code block of a Markdown text, with the lines between it and the block before it."""
    lines = text.splitlines()
    found: list[Block] = []
    gap: list[str] = []
    index = 0
    while index < len(lines):
        opening = FENCE.fullmatch(lines[index])
        if not opening:
            gap.append(lines[index])
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == fence), None)
        if end is None:
            raise ValueError(f"{page}:{index + 1}: a code block that never closes")
        code = "\n".join(line[indent:] for line in lines[index + 1 : end]) + "\n"
        before = lines[index - 1].strip() if index else ""
        found.append(
            Block(f"{page}:{index + 1}", opening["language"], code, before, tuple(gap), (index + 1, end), indent)
        )
        gap = []
        index = end + 1
    return found


def examples(text: str, page: str) -> list[Example]:
    """The marked examples of a Markdown text, each with its shown output; a marked block without one is an error."""
    found = []
    page_blocks = blocks(text, page)
    for position, block in enumerate(page_blocks):
        mark = MARK.fullmatch(block.before)
        if not mark:
            continue
        options = dict(option.split(": ") for option in mark["options"].split("; ")[1:])
        output, following = None, None
        if options.get("output") != "none":
            following = page_blocks[position + 1] if position + 1 < len(page_blocks) else None
            between = [line for line in following.gap if line.strip()] if following else ["(end of page)"]
            if following is None or not (between == [] or (len(between) == 1 and ADMONITION.match(between[0]))):
                raise ValueError(f"{block.where}: example {mark['name']!r} is not followed by its output block")
            output = following.code
        found.append(
            Example(mark["name"], block.where, block.language, block.code, output, options.get("after"), following)
        )
    return found


def page_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


EXAMPLES = [example for path in PAGES for example in examples(path.read_text(), page_name(path))]
BY_NAME = {example.name: example for example in EXAMPLES}


def listeners(config: Path) -> dict[str, str]:
    """host:port of every listener a config.properties names: the HTTP addresses and the gRPC ports."""
    settings = read_properties(config)
    found = {
        key: urlsplit(value).netloc
        for key, value in settings.items()
        if key.endswith("_address") and value.startswith("http")
    }
    grpc = {
        key: f"{settings[key.removesuffix('_port') + '_address']}:{value}"
        for key, value in settings.items()
        if key.startswith("grpc_") and key.endswith("_port")
    }
    return found | grpc


SHIPPED = listeners(SHIPPED_CONFIG)


def differences(shown: str, printed: str) -> list[str]:
    """Where what an example printed differs from the output its page shows; empty when they match.

    JSON (one or more documents) is compared as data, so layout and key order do not matter; anything
    else token by token, so whitespace does not.
    """
    shown_documents, printed_documents = json_documents(shown), json_documents(printed)
    if shown_documents is None:
        return _token_differences(shown, printed)
    if printed_documents is None:
        return [f"the page shows JSON, the example printed something else: {printed.strip()[:200]!r}"]
    if len(shown_documents) != len(printed_documents):
        return [f"the page shows {len(shown_documents)} JSON documents, the example printed {len(printed_documents)}"]
    if len(shown_documents) == 1:
        return _value_differences(shown_documents[0], printed_documents[0], "$")
    return [
        found
        for i, pair in enumerate(zip(shown_documents, printed_documents, strict=True), 1)
        for found in _value_differences(*pair, f"${i}")
    ]


def json_documents(text: str) -> list[Any] | None:
    """The JSON documents a text holds one after another (as `curl` run twice prints them), or None if it is
    not JSON."""
    decoder, documents, position, text = json.JSONDecoder(), [], 0, text.strip()
    try:
        while position < len(text):
            document, position = decoder.raw_decode(text, position)
            documents.append(document)
            while position < len(text) and text[position].isspace():
                position += 1
    except json.JSONDecodeError:
        return None
    return documents if documents else None


def _value_differences(shown: Any, printed: Any, path: str) -> list[str]:
    if isinstance(shown, dict) and isinstance(printed, dict):
        found = [f"{path}: key {key!r} shown, not printed" for key in shown if key not in printed]
        found += [f"{path}: key {key!r} printed, not shown" for key in printed if key not in shown]
        return found + [
            d for key in shown if key in printed for d in _value_differences(shown[key], printed[key], f"{path}.{key}")
        ]
    if isinstance(shown, list) and isinstance(printed, list):
        if len(shown) != len(printed):
            return [f"{path}: {len(shown)} items shown, {len(printed)} printed"]
        return [
            d
            for i, pair in enumerate(zip(shown, printed, strict=True))
            for d in _value_differences(*pair, f"{path}[{i}]")
        ]
    if _same_scalar(shown, printed):
        return []
    return [f"{path}: shown {shown!r}, printed {printed!r}"]


def _same_scalar(shown: Any, printed: Any) -> bool:
    """Strings and integers equal (a digest or a timestamp stands for any), other numbers within TOLERANCE."""
    if isinstance(shown, str) and isinstance(printed, str):
        return _same_string(shown, printed)
    if type(shown) is float and type(printed) is float:
        return abs(shown - printed) <= TOLERANCE
    return type(shown) is type(printed) and shown == printed


def _same_string(shown: str, printed: str) -> bool:
    if SHOWN_DIGEST.fullmatch(shown):
        return bool(DIGEST.fullmatch(printed))
    if TIMESTAMP.fullmatch(shown):
        return bool(TIMESTAMP.fullmatch(printed))
    return shown == printed


def _token_differences(shown: str, printed: str) -> list[str]:
    """Text compared token by token: quoted strings and words exactly, numbers as in JSON."""
    shown_tokens, printed_tokens = list(TOKEN.finditer(shown)), list(TOKEN.finditer(printed))
    # Up to the shorter list: the first differing token says more than the counts, checked after.
    for i, (want, got) in enumerate(zip(shown_tokens, printed_tokens, strict=False)):
        if want["number"] and got["number"]:
            same = _same_scalar(_number(want[0]), _number(got[0]))
        elif want["quoted"] and got["quoted"]:
            same = _same_string(want[0][1:-1], got[0][1:-1])
        else:
            same = want[0] == got[0]
        if not same:
            return [f"token {i}: shown {want[0]!r}, printed {got[0]!r}"]
    if len(shown_tokens) != len(printed_tokens):
        return [f"{len(shown_tokens)} tokens shown, {len(printed_tokens)} printed"]
    return []


def _number(text: str) -> int | float:
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def rerecorded(shown: str, printed: str) -> str:
    """`shown` with every value that differs from what was printed replaced by the printed one, layout kept.

    A shown digest or timestamp stays (it stands for any); a list of plain values that printed another
    number of items is replaced whole; keys are not rewritten.
    """
    shown_documents, printed_documents = json_documents(shown), json_documents(printed)
    edits: list[tuple[int, int, str]] = []
    if shown_documents is None or printed_documents is None or len(shown_documents) != len(printed_documents):
        shown_tokens, printed_tokens = list(TOKEN.finditer(shown)), list(TOKEN.finditer(printed))
        # The token counts may differ here: numbers are taken from the pairs of the common prefix.
        edits = [
            (want.start(), want.end(), got[0])
            for want, got in zip(shown_tokens, printed_tokens, strict=False)
            if want["number"] and got["number"]
        ]
    else:
        shown_tokens = list(JSON_TOKEN.finditer(shown))
        scalars: dict[str, re.Match[str]] = {}
        lists: dict[str, tuple[int, int, int]] = {}
        position = 0
        for index, _ in enumerate(shown_documents, 1):
            position = _value_tokens(
                shown_tokens, position, "$" if len(shown_documents) == 1 else f"${index}", scalars, lists
            )
        values = _values(
            printed_documents[0] if len(printed_documents) == 1 else printed_documents,
            "$" if len(printed_documents) == 1 else "",
        )
        for path, (begin, end, count) in lists.items():
            value = values.get(path)
            if (
                isinstance(value, list)
                and len(value) != count
                and not any(isinstance(item, (dict, list)) for item in value)
            ):
                edits.append((begin, end, json.dumps(value, ensure_ascii=False)))
        edits += [
            (token.start(), token.end(), json.dumps(values[path], ensure_ascii=False))
            for path, token in scalars.items()
            if path in values and not any(begin <= token.start() < end for begin, end, _ in edits)
        ]
    for begin, end, value in sorted(edits, reverse=True):
        if not _same_token(shown[begin:end], value):
            shown = shown[:begin] + value + shown[end:]
    return shown


def _same_token(shown: str, printed: str) -> bool:
    """Whether a shown token may stay: the same text, a digest or timestamp standing for the printed one, or the same
    number."""
    if shown == printed:
        return True
    if shown[:1] == '"' and printed[:1] == '"':
        return _same_string(shown[1:-1], printed[1:-1])
    numbers = TOKEN.fullmatch(shown), TOKEN.fullmatch(printed)
    return all(match and match["number"] for match in numbers) and _number(shown) == _number(printed)


def _value_tokens(
    tokens: list[re.Match[str]],
    position: int,
    path: str,
    scalars: dict[str, re.Match[str]],
    lists: dict[str, tuple[int, int, int]],
) -> int:
    """Walk one JSON value of `tokens` from `position`, noting each scalar's token and each list's span and length by
    path; return the next position."""
    token = tokens[position]
    if token[0] in "{[":
        closing, index, position = "}" if token[0] == "{" else "]", 0, position + 1
        while tokens[position][0] != closing:
            if closing == "}":
                key, position = json.loads(tokens[position][0]), position + 2
                position = _value_tokens(tokens, position, f"{path}.{key}", scalars, lists)
            else:
                position = _value_tokens(tokens, position, f"{path}[{index}]", scalars, lists)
                index += 1
            position += tokens[position][0] == ","
        if closing == "]":
            lists[path] = (token.start(), tokens[position].end(), index)
        return position + 1
    scalars[path] = token
    return position + 1


def _values(value: Any, path: str) -> dict[str, Any]:
    """Every value of a JSON value, lists and scalars, by its path in the notation `differences` uses (`$2` for a second
    document)."""
    if isinstance(value, dict):
        return {found: item for key, child in value.items() for found, item in _values(child, f"{path}.{key}").items()}
    if isinstance(value, list):
        where = (lambda i: f"${i}") if path == "" else (lambda i: f"{path}[{i - 1}]")
        found = {} if path == "" else {path: value}
        return found | {
            inner: item for i, child in enumerate(value, 1) for inner, item in _values(child, where(i)).items()
        }
    return {path: value}


def record(example: Example, printed: str) -> None:
    """Rewrite the example's output block in its page with the numbers it printed."""
    assert example.output is not None and example.output_block is not None
    updated = rerecorded(example.output, printed)
    if updated == example.output:
        return
    page = ROOT / example.output_block.where.rsplit(":", 1)[0]
    lines = page.read_text().splitlines(keepends=True)
    first, end = example.output_block.lines
    prefix = " " * example.output_block.indent
    lines[first:end] = [prefix + line + "\n" if line else "\n" for line in updated.removesuffix("\n").split("\n")]
    page.write_text("".join(lines))


def run(example: Example, folder: Path, env: dict[str, str], addresses: dict[str, str]) -> str:
    """Run an example (after the one it names) in `folder` against the test server; return what it printed."""
    if example.after:
        run(BY_NAME[example.after], folder, env, addresses)
    code = example.code
    for shipped, ours in addresses.items():
        code = code.replace(shipped, ours)
    command = ["bash", "-euo", "pipefail", "-c", code] if example.language == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{example.where}: {example.name} exited with {done.returncode}:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Both demos, built from the trained weights in artifacts/ into a store of their own, on one private TorchServe."""
    assert (ROOT / "artifacts" / "weights" / ".trained").exists(), (
        "the demos are not trained: run `make demo` (`make test` does)"
    )
    store = tmp_path_factory.mktemp("store")
    subprocess.run(
        [sys.executable, "-m", "archive_scripts.build_archives", "--store", str(store), *DEMOS],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    instance = private_server(tmp_path_factory.mktemp("torchserve"), store, port_offset=10900)
    try:
        start(instance, store)
        for name in DEMOS:
            register(instance, name, workers=1)  # TorchServe starts the archive's own workers (2 for shapes) anyway
        yield instance
    finally:
        stop(instance)


@pytest.fixture(scope="module")
def workspace(demo_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository's root after `make serve`: artifacts/, .venv and the server's key file."""
    folder = tmp_path_factory.mktemp("examples")
    for name in ("artifacts", ".venv"):
        (folder / name).symlink_to(ROOT / name)
    (folder / "key_file.json").symlink_to(demo_server.workdir / "key_file.json")
    return folder


@pytest.mark.parametrize(
    ("shown", "printed", "expected"),
    [
        pytest.param(
            '{\n  "label": "present",\n  "score": 0.666667,\n  "frames": [1, 2]\n}',
            '{"frames": [1, 2], "score": 0.6665, "label": "present"}',
            [],
            id="same-json-other-layout",
        ),
        pytest.param(
            '{"label": "absent"}',
            '{"label": "present"}',
            ["$.label: shown 'absent', printed 'present'"],
            id="wrong-label",
        ),
        pytest.param(
            '{"label": "present", "top": []}',
            '{"label": "present"}',
            ["$: key 'top' shown, not printed"],
            id="key-only-shown",
        ),
        pytest.param(
            '{"label": "present"}',
            '{"label": "present", "top": []}',
            ["$: key 'top' printed, not shown"],
            id="key-only-printed",
        ),
        pytest.param('{"score": 0.5}', '{"score": 0.502}', ["$.score: shown 0.5, printed 0.502"], id="score-too-far"),
        pytest.param('{"frames": 4}', '{"frames": 3}', ["$.frames: shown 4, printed 3"], id="integer-differs"),
        pytest.param(
            '{"labels": ["disc", "cross"]}',
            '{"labels": ["disc"]}',
            ["$.labels: 2 items shown, 1 printed"],
            id="one-item-fewer",
        ),
        pytest.param('{"sha256": "bd292a8f…"}', json.dumps({"sha256": "a" * 64}), [], id="abridged-digest"),
        pytest.param(
            '{"label": "bd292a8f…"}',
            '{"label": "present"}',
            ["$.label: shown 'bd292a8f…', printed 'present'"],
            id="digest-for-a-label",
        ),
        pytest.param(
            '{"built_at": "2026-11-26T00:07:57+00:00"}', '{"built_at": "2026-12-03T06:42:29+00:00"}', [], id="timestamp"
        ),
        pytest.param(
            '{"ready": true}\n{"name": "shapes"}',
            '{"ready": true} {"name": "multishape"}',
            ["$2.name: shown 'shapes', printed 'multishape'"],
            id="second-document",
        ),
        pytest.param(
            '{"ready": true}\n{"name": "shapes"}',
            '{"ready": true}',
            ["the page shows 2 JSON documents, the example printed 1"],
            id="documents-missing",
        ),
        pytest.param(
            '{"ready": true}',
            "curl: (7) Failed to connect",
            ["the page shows JSON, the example printed something else: 'curl: (7) Failed to connect'"],
            id="json-shown-text-printed",
        ),
        pytest.param("[b'present'] [[0.333333 0.666667]]", "[b'present']\n [[0.3335 0.6665]]", [], id="numpy-text"),
        pytest.param(
            "[b'present'] [[0. 1.]]",
            "[b'absent'] [[0. 1.]]",
            ["token 2: shown \"'present'\", printed \"'absent'\""],
            id="numpy-wrong-label",
        ),
        pytest.param("[b'present']", "[b'present'] [[0. 1.]]", ["4 tokens shown, 10 printed"], id="text-shorter"),
    ],
)
def test_differences(shown: str, printed: str, expected: list[str]) -> None:
    assert differences(shown, printed) == expected


@pytest.mark.parametrize(
    ("shown", "printed", "expected"),
    [
        pytest.param(
            '{\n  "label": "present",\n  "score": 0.666667,\n  "frames": [1, 2]\n}',
            '{"frames": [1, 2], "score": 0.6665, "label": "present"}',
            '{\n  "label": "present",\n  "score": 0.6665,\n  "frames": [1, 2]\n}',
            id="json-layout-kept",
        ),
        pytest.param(
            '{"a": 0.5, "b": [0.25, 0.75]}',
            '{"b": [0.2, 0.8], "a": 0.5}',
            '{"a": 0.5, "b": [0.2, 0.8]}',
            id="json-in-lists",
        ),
        pytest.param(
            '{"n": 4, "label": "absent"}',
            '{"n": 3, "label": "present"}',
            '{"n": 3, "label": "present"}',
            id="integers-and-strings",
        ),
        pytest.param(
            '{"sha256": "bd292a8f…", "ok": true}',
            '{"sha256": "%s", "ok": false}' % ("a" * 64),
            '{"sha256": "bd292a8f…", "ok": false}',
            id="digest-stays",
        ),
        pytest.param('{"score": 1.0}', '{"score": 1}', '{"score": 1.0}', id="same-number"),
        pytest.param(
            '{"status": "Model \\"a\\" ok", "n": 0.1}',
            '{"status": "Model \\"a\\" ok", "n": 0.2}',
            '{"status": "Model \\"a\\" ok", "n": 0.2}',
            id="escaped-quotes",
        ),
        pytest.param(
            '{"labels": ["disc", "star"],\n "n": [[1, 2]]}',
            '{"labels": ["disc", "star", "cross"], "n": [[1, 3]]}',
            '{"labels": ["disc", "star", "cross"],\n "n": [[1, 3]]}',
            id="list-of-another-length",
        ),
        pytest.param('{"s": 0.1}\n{"s": 0.2}', '{"s": 0.1} {"s": 0.3}', '{"s": 0.1}\n{"s": 0.3}', id="second-document"),
        pytest.param(
            "[b'present'] [[0.333333 0.666667]]",
            "[b'present']\n [[0.3335 0.6665]]",
            "[b'present'] [[0.3335 0.6665]]",
            id="numpy-text",
        ),
    ],
)
def test_rerecorded_takes_the_printed_numbers_and_keeps_the_rest(shown: str, printed: str, expected: str) -> None:
    assert rerecorded(shown, printed) == expected


WRONG_PAGE = """A request whose shown answer has the wrong label:

<!-- example: wrong -->
```bash
curl -s http://127.0.0.1:8080/predictions/shapes
```

??? success "Answer"

    ```json
    {"ensemble": "shapes", "predictions": [{"label": "absent", "score": 1.0}]}
    ```
"""


def test_a_wrong_example_in_the_docs_fails() -> None:
    """The page's own parser finds the folded output, and the comparison refuses its wrong label."""
    [example] = examples(WRONG_PAGE, "wrong.md")
    assert (example.name, example.where, example.language, example.after) == ("wrong", "wrong.md:4", "bash", None)
    printed = '{"ensemble": "shapes", "predictions": [{"label": "present", "score": 1.0}]}\n'
    assert example.output is not None
    assert differences(example.output, printed) == ["$.predictions[0].label: shown 'absent', printed 'present'"]


@pytest.mark.parametrize(
    ("page", "message"),
    [
        pytest.param(
            "<!-- example: lonely -->\n```bash\ncurl -s x\n```\n",
            "p.md:2: example 'lonely' is not followed by its output block",
            id="no-output",
        ),
        pytest.param(
            "<!-- example: prose -->\n```bash\ncurl -s x\n```\n\nSome prose.\n\n```json\n{}\n```\n",
            "p.md:2: example 'prose' is not followed by its output block",
            id="prose-before-output",
        ),
    ],
)
def test_a_marked_example_without_its_output_is_refused(page: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        examples(page, "p.md")
    assert str(refused.value) == message


def test_every_example_that_talks_to_the_server_is_marked() -> None:
    """A bash or Python block naming a shipped address needs a mark: run, or not tested with a reason."""
    unmarked = [
        block.where
        for path in PAGES
        for block in blocks(path.read_text(), page_name(path))
        if block.language in ("bash", "python")
        and any(address in block.code for address in SHIPPED.values())
        and not (MARK.fullmatch(block.before) or NOT_TESTED.fullmatch(block.before))
    ]
    assert unmarked == []


def test_example_names_are_unique_and_prerequisites_exist() -> None:
    names = [example.name for example in EXAMPLES]
    assert len(names) == len(set(names)), names
    assert [example.after for example in EXAMPLES if example.after and example.after not in BY_NAME] == []


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_example_prints_what_the_docs_show(example: Example, demo_server: Server, workspace: Path) -> None:
    ours = listeners(demo_server.config)
    addresses = {SHIPPED[key]: ours[key] for key in SHIPPED}
    env = {
        **os.environ,
        "INF": demo_server.key("inference"),
        "MGMT": demo_server.key("management"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    printed = run(example, workspace, env, addresses)
    if example.output is not None and os.environ.get("RECORD_EXAMPLES") == "1":
        record(example, printed)
        example = replace(example, output=rerecorded(example.output, printed))
    if example.output is None:
        assert printed == ""
    else:
        assert differences(example.output, printed) == [], f"{example.where}: {example.name} printed:\n{printed}"
