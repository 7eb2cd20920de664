"""The user's DeepSpeed JSON, read and checked before any model loads, each problem one line naming the file.

- Not JSON (a YAML file, a trailing comma, a duplicated key): the parser's message with its line and column.
- A key that DeepSpeed's own config models do not know (``zero_optimization.overlap_com``) or a value of the
  wrong type: DeepSpeed's validation (pydantic) of the complete engine config, shortened to the key path and its
  rule, with the nearest key the model does know.
- A top-level key that DeepSpeed never reads (``train_micro_batch_sise_per_gpu``): DeepSpeed ignores it without a
  word. DeepSpeed keeps no list of its top-level keys, so the keys it knows are those its config parser looks up
  while it parses this very config (recorded), plus the key-name constants of its modules (keys read later, by
  the engine). A key close to a known one is refused as a misspelling of it; any other unknown key is a warning.

Model and loss code never import this module (it imports DeepSpeed); ``sd_ds.engine`` does.
"""

from __future__ import annotations

import collections.abc
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

# Sections sd-ds itself reads or writes into: they must be JSON objects.
OBJECT_SECTIONS = ("zero_optimization", "bf16", "fp16", "data_types", "timers", "checkpoint")
# How alike an unknown key and a known one must be (difflib ratio) to call the unknown one a misspelling:
# "train_micro_batch_sise_per_gpu" vs "train_micro_batch_size_per_gpu" is 0.97, "overlap_com" vs "overlap_comm"
# 0.96; two different real keys such as "fp16" and "bf16" are 0.75.
MISSPELLING_RATIO = 0.85


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config file is unusable; the message names the file and what is wrong, in one line."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``DeepSpeedConfigError`` (one line naming the file) for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: cannot read it ({type(e).__name__}: {e})") from None
    try:
        config = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        yaml_hint = ("; it looks like YAML, and DeepSpeed configs are JSON (e.g. "
                     '{"zero_optimization": {"stage": 2}})'
                     if path.suffix.lower() in (".yaml", ".yml") or not text.lstrip().startswith(("{", "[")) else "")
        raise DeepSpeedConfigError(f"DeepSpeed config {path} is not valid JSON: {e.msg} at line {e.lineno}, column "
                                   f"{e.colno}{yaml_hint}") from None
    except ValueError as e:  # a duplicated key: json would keep the last one silently
        raise DeepSpeedConfigError(f"DeepSpeed config {path}: {e}") from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"DeepSpeed config {path} must hold a JSON object ({{...}}), not a "
                                   f"{type(config).__name__}")
    for section in OBJECT_SECTIONS:
        if section in config and not isinstance(config[section], dict):
            raise DeepSpeedConfigError(f"DeepSpeed config {path}: '{section}' must be an object ({{...}}), not "
                                       f"{json.dumps(config[section])}")
    return config


class _LookupRecorder(dict):
    """A dict that notes every key looked up in it (``d[k]``, ``d.get(k)``, ``k in d``, ``k in d.keys()``), its
    copies included: what DeepSpeed's config parser reads."""

    def __init__(self, data: dict[str, Any], looked_up: Optional[set] = None) -> None:
        super().__init__(data)
        self.looked_up: set = set() if looked_up is None else looked_up

    def __getitem__(self, key: Any) -> Any:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.looked_up.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.looked_up.add(key)
        return super().__contains__(key)

    def keys(self) -> collections.abc.KeysView:  # type: ignore[override]
        return collections.abc.KeysView(self)  # its `in` calls ours

    def pop(self, key: Any, *default: Any) -> Any:
        self.looked_up.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.looked_up.add(key)
        return super().setdefault(key, default)

    def __copy__(self) -> "_LookupRecorder":
        return _LookupRecorder(self, self.looked_up)


_KEY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _deepspeed_key_constants() -> set[str]:
    """Every lower_snake string held by an UPPER_CASE constant of a loaded DeepSpeed module: DeepSpeed names its
    config keys that way (``TRAIN_BATCH_SIZE = "train_batch_size"``)."""
    known = set()
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] != "deepspeed" or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr.isupper() and isinstance(value, str) and _KEY_NAME.match(value):
                known.add(value)
    return known


def _config_model_class(title: str) -> Optional[type]:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _field_names(model: Optional[type], parents: tuple[str, ...]) -> list[str]:
    """The field names (and aliases) of ``model`` or of the nested model at ``parents`` inside it."""
    import typing

    from pydantic import BaseModel

    for name in parents:
        if model is None:
            return []
        field = model.model_fields.get(name) or next(
            (f for f in model.model_fields.values() if f.alias == name), None)
        if field is None:
            return []
        hint = field.annotation
        candidates = [hint, *typing.get_args(hint)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if model is None:
        return []
    return sorted({*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)})


def _section_holding(config: dict[str, Any], path: tuple[str, ...]) -> Optional[str]:
    """The top-level key whose object holds ``path`` (pydantic reports paths inside the model that failed)."""
    for key, value in config.items():
        node = value
        for part in path:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return key
    return None


def _validation_message(err: Any, config: dict[str, Any]) -> str:
    """One line from a pydantic ValidationError: the first problem, with the key path from the config's root."""
    first = err.errors()[0]
    loc = tuple(str(x) for x in first["loc"])
    section = _section_holding(config, loc) if loc else None
    where = ".".join(([section] if section else []) + list(loc)) or err.title
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        near = difflib.get_close_matches(loc[-1], _field_names(_config_model_class(err.title), loc[:-1]), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return f"'{where}' is not a DeepSpeed setting ({err.title} does not know it){hint}{more}"
    return f"'{where}': {first['msg']} (got {json.dumps(first.get('input'), default=str)}){more}"


def check_with_deepspeed(config: dict[str, Any], source: str | Path, user_keys: Optional[set[str]] = None) -> list[str]:
    """Validate the complete engine ``config`` with DeepSpeed's own config parser (``DeepSpeedConfig``, which
    ``deepspeed.initialize`` runs later). Raises ``DeepSpeedConfigError`` naming ``source`` for a value or nested
    key DeepSpeed refuses and for a misspelled top-level key; returns one warning per other top-level key of
    ``user_keys`` (default: all) that DeepSpeed does not read."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    recorder = _LookupRecorder(config)
    try:
        DeepSpeedConfig(recorder)
    except pydantic.ValidationError as e:
        raise DeepSpeedConfigError(f"DeepSpeed config {source}: {_validation_message(e, config)}") from None
    except (ValueError, AssertionError, TypeError, KeyError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeepSpeedConfigError(f"DeepSpeed config {source}: DeepSpeed refuses it: {reason}") from None
    except Exception as e:  # DeepSpeed's own DeepSpeedConfigError (e.g. a removed feature's key) subclasses Exception
        if type(e).__name__ != "DeepSpeedConfigError":
            raise
        raise DeepSpeedConfigError(f"DeepSpeed config {source}: {str(e).strip()}") from None
    known = recorder.looked_up | _deepspeed_key_constants()
    warnings = []
    for key in sorted(set(config if user_keys is None else user_keys) - known):
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=MISSPELLING_RATIO)
        if near:
            raise DeepSpeedConfigError(f"DeepSpeed config {source}: unknown key '{key}', which DeepSpeed would "
                                       f"ignore: did you mean '{near[0]}'?")
        warnings.append(f"DeepSpeed config {source}: DeepSpeed does not read the key '{key}'; it has no effect")
    return warnings
