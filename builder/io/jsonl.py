"""JSON Lines input files (calibration sets, prompt sets): one object per non-blank line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.errors import UserError


def read_jsonl_objects(
    path: Path, error: type[UserError] = UserError
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `error` names the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: unreadable ({err})") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise error(f"{path}:{number}: expected a JSON object")
        items.append((number, item))
    return items
