"""Rendering data into HTML without letting the data become markup, script or a path outside the report.

Every report page is filled here: placeholders are replaced in one pass (a value inserted for one
placeholder is never scanned for another), values are escaped for their context by the caller, and
JSON bound for a <script> element cannot close it or start markup. Ids read back from a run's tables
pass the same rule as input ids before they name a file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from phanes_cli.errors import InputError
from phanes_cli.infra.folders import check_id
from phanes_cli.run_folder.layout import file_stem

_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")

_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def fill(template: str, fields: dict[str, str]) -> str:
    """The template with each @@KEY@@ replaced by fields[KEY], in a single pass; a missing key is a bug."""
    missing = set(_PLACEHOLDER.findall(template)) - set(fields)
    if missing:
        raise KeyError(f"template placeholders without a value: {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)


def json_for_script(payload: Any) -> str:
    """JSON for a <script type="application/json"> element: no '<', '>', '&' or line separator appears raw."""
    text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def script_body(code: str, origin: str) -> str:
    """Third-party JavaScript inlined in a <script> element, refused if it could end the element early."""
    lowered = code.lower()
    if "</script" in lowered or "<!--" in lowered:
        raise ValueError(f"{origin} contains '</script' or '<!--' and cannot be inlined")
    return code


def safe_stem(vid: Any) -> str | None:
    """The file stem an id's report files take, or None when the id cannot name a file.

    The rule of every id (`infra.folders.check_id`); ids with a leading '.' or over-long take
    `layout.file_stem`'s hashed form.
    """
    try:
        return file_stem(check_id(vid))
    except InputError:
        return None


def inside(folder: Path, path: Path) -> Path:
    """`path`, after checking that it resolves inside `folder` (no write may leave the report's folder)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise InputError(path, f"resolves outside {folder}; refusing to write it")
    return path
