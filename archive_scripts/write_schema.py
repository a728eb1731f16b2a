"""Write ensembles.schema.json from the config models (`make schema`), so editors check ensembles.yaml as it is typed.

Usage: python -m archive_scripts.write_schema

The schema is generated, never edited: tests/test_schema.py fails when the committed file differs from
what the models in handlers/config/ generate now.
"""

from __future__ import annotations

import json
from pathlib import Path

from handlers.config.schema import ensembles_json_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "ensembles.schema.json"


def schema_text() -> str:
    """The schema file's exact text: indented JSON and a final newline, so diffs stay readable."""
    return json.dumps(ensembles_json_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    SCHEMA_PATH.write_text(schema_text())
    print(f"wrote {SCHEMA_PATH.name}")


if __name__ == "__main__":
    main()
