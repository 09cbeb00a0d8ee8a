"""`phanes config show`: a config as complete YAML, every key with its value and allowed range.

What a run really uses is the file's values over the defaults; printing all of them, each commented with
the range `config.LIMITS` enforces, makes a config readable without the source. The output is valid YAML
that loads back to the same config (a test checks), so it can start a new config file.
"""

from __future__ import annotations

from typing import Any

import yaml

from phanes_cli.config import LIMITS, PhanesConfig

_STAGES = ("stage1", "stage2")  # train.stage1 / train.stage2 share the "stage.*" limits


def limit_key(path: tuple[str, ...]) -> str:
    """The LIMITS key of a config key path: ("train", "stage1", "lr") -> "stage.lr"."""
    if len(path) == 3 and path[0] == "train" and path[1] in _STAGES:
        return f"stage.{path[2]}"
    return ".".join(path)


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _lines(data: dict[str, Any], defaults: dict[str, Any], path: tuple[str, ...]) -> list[str]:
    lines = []
    indent = "  " * len(path)
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_lines(value, defaults[key], (*path, key)))
            continue
        limit = LIMITS.get(limit_key((*path, key)))
        optional = "null or " if defaults[key] is None else ""  # the optional keys are the ones defaulting to null
        comment = f"  # allowed: {optional}{limit[1]}" if limit is not None else ""
        lines.append(f"{indent}{key}: {_scalar(value)}{comment}")
    return lines


def render_config(cfg: PhanesConfig) -> str:
    """Every key of `cfg` as YAML, each leaf commented with its allowed range where one applies."""
    return "\n".join(_lines(cfg.to_dict(), PhanesConfig().to_dict(), ())) + "\n"
