"""read_properties reads a config.properties by java.util.Properties' rules, as TorchServe does: one case per rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from handlers.config.files import read_properties
from handlers.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("key=value", {"key": "value"}, id="equals"),
        pytest.param("key:value", {"key": "value"}, id="colon"),
        pytest.param("key value", {"key": "value"}, id="blank-separator"),
        pytest.param("  key \t=  value", {"key": "value"}, id="blanks-around-separator-skipped"),
        pytest.param("key=value  ", {"key": "value  "}, id="trailing-blanks-kept"),
        pytest.param("# a comment\n! another\n   # indented\nkey=value", {"key": "value"}, id="comments"),
        pytest.param("key=#not a comment", {"key": "#not a comment"}, id="hash-inside-a-value"),
        pytest.param("\n  \n\t\nkey=value\n\n", {"key": "value"}, id="blank-lines"),
        pytest.param("key=first \\\n     second", {"key": "first second"}, id="continued-line"),
        pytest.param("ke\\\n  y=value", {"key": "value"}, id="continued-key"),
        pytest.param(
            "key=ends in a backslash\\\\\nnext=line",
            {"key": "ends in a backslash\\", "next": "line"},
            id="escaped-backslash-continues-nothing",
        ),
        pytest.param("a\\=b=c", {"a=b": "c"}, id="escaped-equals-in-key"),
        pytest.param("a\\:b:c", {"a:b": "c"}, id="escaped-colon-in-key"),
        pytest.param("a\\ b=c", {"a b": "c"}, id="escaped-blank-in-key"),
        pytest.param("key=a\\tb\\nc\\rd\\fe", {"key": "a\tb\nc\rd\fe"}, id="character-escapes"),
        pytest.param("key=caf\\u00e9", {"key": "café"}, id="unicode-escape"),
        pytest.param("key=\\q\\#", {"key": "q#"}, id="other-escapes-drop-the-backslash"),
        pytest.param("key", {"key": ""}, id="key-alone"),
        pytest.param("key=", {"key": ""}, id="empty-value"),
        pytest.param("key=1\nkey=2", {"key": "2"}, id="last-wins"),
        pytest.param("a=1\r\nb=2\rc=3\n", {"a": "1", "b": "2", "c": "3"}, id="crlf-cr-lf"),
        pytest.param(
            'model_snapshot={"name":"startup.cfg","models":{}}',
            {"model_snapshot": '{"name":"startup.cfg","models":{}}'},
            id="separators-after-the-first-are-value",
        ),
        pytest.param(
            "vmargs=-XX:+UseSerialGC -XX:TieredStopAtLevel=1",
            {"vmargs": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"},
            id="colons-and-equals-in-a-value",
        ),
    ],
)
def test_text_is_read_by_java_rules(text: str, expected: dict[str, str]) -> None:
    assert read_properties(text) == expected


def test_a_file_is_read_as_latin_1(tmp_path: Path) -> None:
    """Properties.load(InputStream) reads ISO 8859-1, so a byte 0xE9 is é, not a UTF-8 error."""
    config = tmp_path / "config.properties"
    config.write_bytes(b"name=caf\xe9\n")
    assert read_properties(config) == {"name": "café"}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        pytest.param(
            "key=\\u00e", "properties text: cannot read: Invalid \\u escape sequence: \\u00e", id="bad-unicode-escape"
        ),
        pytest.param(
            ROOT / "no-such.properties",
            "no-such.properties: cannot read: [Errno 2] No such file or directory",
            id="missing-file",
        ),
    ],
)
def test_unreadable_properties_name_the_source(source: Path | str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_properties(source)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        pytest.param("config.properties", "inference_address", "http://127.0.0.1:8080", id="shipped-inference"),
        pytest.param("config.properties", "allowed_urls", "(?!)", id="shipped-allowed-urls"),
        pytest.param("config.properties", "oip_gateway_address", "http://127.0.0.1:8083", id="shipped-gateway"),
        pytest.param("deploy/kserve/config.properties", "metrics_address", "http://0.0.0.0:8082", id="kserve-metrics"),
        pytest.param(
            "deploy/kserve/config.properties",
            "model_snapshot",
            '{"name":"startup.cfg","modelCount":0,"models":{}}',
            id="kserve-snapshot",
        ),
    ],
)
def test_shipped_configs_read_as_written(path: str, key: str, value: str) -> None:
    assert read_properties(ROOT / path)[key] == value
