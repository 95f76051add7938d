"""Config loading: YAML → environment expansion → --set overrides → validation, with messages that name the key."""
from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmc.config.schema import Config
from llmc.errors import ConfigError
from llmc.registry import did_you_mean

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Keys holding filesystem paths: made absolute against the working directory at load time.
PATH_KEYS = {("model", "path"), ("calib", "path"), ("eval", "path"), ("eval", "include_path"),
             ("save", "save_path"), ("quant", "special", "scale_path"), ("quant", "special", "clip_path"),
             ("opencompass", "cfg_path"), ("opencompass", "output_path")}


def expand_env(value: Any, key: str = "") -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of a nested structure."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{key}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(key, f"environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)")

    return _ENV.sub(sub, value)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one --set KEY=VALUE; VALUE is parsed as YAML (3 → int, true → bool, [a, b] → list)."""
    if "=" not in assignment:
        raise ConfigError("--set", f"'{assignment}' is not KEY=VALUE (e.g. quant.weight.bit=3)")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _descend_list(node, part, dotted)
            continue
        node = node.setdefault(part, {})
        if isinstance(node, list) and not parts[i + 1].isdigit():
            node = _single(node, dotted)
    node[parts[-1]] = yaml.safe_load(text)


def _single(items: list, dotted: str) -> dict:
    if len(items) != 1:
        raise ConfigError("--set", f"'{dotted}' is ambiguous: that section is a list of {len(items)}; "
                          "name the entry by index (e.g. eval.0.seq_len=512)")
    return items[0]


def _descend_list(items: list, part: str, dotted: str) -> Any:
    return items[int(part)] if part.isdigit() else _single(items, dotted)[part]


def _absolutize(raw: dict) -> None:
    for path in PATH_KEYS:
        sections = [raw.get(path[0])]
        if isinstance(sections[0], list):
            sections = sections[0]
        for section in sections:
            node = section
            for part in path[1:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
                value = node[path[-1]]
                if not value.startswith("pkg:") and "://" not in value:
                    node[path[-1]] = os.path.abspath(os.path.expanduser(value))


def _fields_at(loc: tuple, root: Any = Config) -> list[str]:
    """The field names allowed at a location in the schema (for did-you-mean on unknown keys)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, single_eval: bool = False, root: Any = Config) -> str:
    """One line per error; `root` is the model validated (Config, or an algorithm's Options)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if single_eval and loc[:2] == ("eval", 0):
            loc = ("eval",) + loc[2:]  # the user wrote one eval section, not a list
        key = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(loc[:-1], root)
            hint = did_you_mean(str(loc[-1]), allowed)
            lines.append(f"{key}: unknown key.{hint} Allowed here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_raw(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"no such file: {path}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections (base, model, calib, eval, quant, save)")
    for assignment in overrides:
        apply_override(raw, assignment)
    return raw


def validate(raw: dict) -> Config:
    raw = expand_env(raw)
    _absolutize(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        text = format_validation_error(err, single_eval=isinstance(raw.get("eval"), dict))
        raise ConfigError("", "invalid config:\n" + text) from None


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    """Read, expand and validate a config file; semantic checks that need registries run in llmc.config.checks."""
    from llmc.config.checks import check_config

    config = validate(load_raw(path, overrides))
    check_config(config)
    return config
