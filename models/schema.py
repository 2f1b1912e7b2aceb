"""Writes the manifest's JSON Schema to docs/ (`python -m models.schema`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.manifest import Manifest

SCHEMA_PATH = Path("docs/manifest.schema.json")


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.json, as published for non-Python readers."""
    return Manifest.model_json_schema(mode="serialization")


if __name__ == "__main__":
    SCHEMA_PATH.write_text(json.dumps(manifest_json_schema(), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")
