"""YAML configs validated into dataclasses, with ``key.sub=value`` overrides.

Unknown keys are errors that name the key and suggest the closest valid one; values are
checked against the dataclass field types (int, float, bool, str, list, dict, Optional,
nested dataclasses, Literal).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lowbit.errors import ConfigError, LimitError
from lowbit.limits import env_name, limit

T = TypeVar("T")


def closest(name: str, choices: typing.Iterable[str]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown_name_error(kind: str, name: str, valid: typing.Iterable[str]) -> ConfigError:
    """The error for an unknown registry/method/model name: lists the valid ones and the closest."""
    valid = sorted(valid)
    return ConfigError(f"unknown {kind} '{name}'{closest(name, valid)}; valid: {', '.join(valid)}")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: the problem and where it is."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return f"{exc.problem or exc.context}{where}"
    return " ".join(str(exc).split())


def _expanded_size(root: yaml.Node, where: str) -> int:
    """Nodes of ``root`` with every alias expanded (bounded), rejecting recursive aliases and deep nesting."""
    sizes: dict[int, int] = {}
    max_nodes, max_depth = limit("yaml_nodes"), limit("yaml_depth")

    def visit(node: yaml.Node, depth: int, active: frozenset[int]) -> int:
        if depth > max_depth:
            raise LimitError(f"{where}: YAML nested deeper than {max_depth} levels; flatten it "
                             f"(or raise {env_name('yaml_depth')})")
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise ConfigError(f"{where}: a YAML alias refers to itself (recursive anchor); remove it")
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        inner = active | {id(node)}
        size = 1 + sum(visit(child, depth + 1, inner) for child in children)
        if size > max_nodes:
            raise LimitError(f"{where}: YAML expands to more than {max_nodes:,} values (an alias bomb?); "
                             f"simplify it or raise {env_name('yaml_nodes')}")
        sizes[id(node)] = size
        return size

    return visit(root, 0, frozenset())


class _Loader(yaml.SafeLoader):
    """The safe loader, reading exponent numbers without a dot (``5e-5``, ``1E+3``) as floats as YAML 1.2
    and every user do; PyYAML's YAML 1.1 rules would leave them strings that a float field then refuses."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document with the safe loader, bounded in size, alias expansion and depth.

    Python tags, syntax errors, recursive anchors and alias bombs become one-line ConfigErrors.
    """
    if len(text) > limit("config_bytes"):
        raise LimitError(f"{where}: {len(text):,} characters of YAML exceed the limit of "
                         f"{limit('config_bytes'):,}; shorten it or raise {env_name('config_bytes')}")
    try:
        loader = _Loader(text)  # its reader already rejects control characters
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({yaml_problem(exc)}); remove that character") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.constructor.ConstructorError as exc:
        raise ConfigError(f"{where}: invalid YAML ({yaml_problem(exc)}); only plain values are allowed, "
                          "no tags such as !!python/object") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({yaml_problem(exc)}); fix the syntax there") from None
    except RecursionError:
        raise LimitError(f"{where}: YAML nested too deeply; flatten it") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` with a clear error for a missing file, bad encoding or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass the path of an existing YAML file")
    if path.stat().st_size > limit("config_bytes"):
        raise LimitError(f"{path}: {path.stat().st_size:,} bytes exceed the config size limit of "
                         f"{limit('config_bytes'):,}; shorten it or raise {env_name('config_bytes')}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override '{key}'") if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override '{item}': empty key part; write key.sub=value")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, validating keys and value types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{closest(str(key), fields)}; valid keys here: "
                              f"{', '.join(sorted(fields))}")
        kwargs[key] = _coerce(hints[key], value, path)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        prefix = where or cls.__name__
        if not message.startswith(prefix):
            message = f"{prefix}: {message}"
        raise ConfigError(message) from None


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-ready) form of a config dataclass."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Read YAML ``path`` (or start empty), apply overrides and validate into ``cls``."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides), where="")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}"
                              f"{closest(str(value), map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where=path)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return value
