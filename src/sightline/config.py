"""Configs: frozen dataclasses with a docstring per field, saved and read as JSON or YAML, and turned into commands.

Every job has one config class; its fields are the only place a default is declared. The CLI is
generated from it (`add_arguments` / `config_from_args`): one flag per field (`foo_bar` ->
`--foo-bar`; booleans get `--x/--no-x`; tuples take several values or a comma list; nested
dataclasses get `--outer.inner`), the field's docstring as help, and `--config FILE` to start from a
saved config (flags given on the command line override the file). A run saves the config it ran
with (`to_dict`), and `from_dict` reads it back.

A field may carry `metadata` for the CLI:
    flags: tuple of flag names (default: the field's name), the first one shown
    positional: True for a positional argument
    parse: a function str -> value for one command-line value (e.g. "0:30:20" -> scales)
    group: a `FlagGroup`, several flags that build one field (an SAE grid from --arch/--width/--k)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from sightline.errors import UserError

_NONE_WORDS = ("none", "null")


# ---------------------------------------------------------------------------------- field docs
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its documentation: the string after the field (attribute docstring), else the
    comment at the end of the field's line. Inherited fields come from the base classes."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return docs
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name = node.target.id
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[name] = inspect.cleandoc(nxt.value.value)
            continue
        line = lines[node.end_lineno - 1]
        comment = _trailing_comment(line)
        if comment:
            docs[name] = comment
    return docs


def _trailing_comment(line: str) -> str:
    """The `# comment` ending a line of code ('' if none), ignoring '#' inside strings."""
    import io
    import tokenize

    try:
        for tok in tokenize.generate_tokens(io.StringIO(line).readline):
            if tok.type == tokenize.COMMENT:
                return tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return ""
    return ""


# ---------------------------------------------------------------------------------- types
def _hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None` / Optional[T], else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _tuple_item(tp: Any) -> Any | None:
    """T for tuple[T, ...] (or list[T]), else None."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _convert(value: Any, tp: Any, where: str) -> Any:
    """A JSON/YAML value converted to the field type `tp` (lists -> tuples, dicts -> dataclasses)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise UserError(f"config field {where} cannot be null")
    item = _tuple_item(inner)
    if item is not None:
        if isinstance(value, str):
            value = [v for v in (x.strip() for x in value.split(",")) if v]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        out = tuple(_convert(v, item, f"{where}[{k}]") for k, v in enumerate(value))
        return list(out) if typing.get_origin(inner) is list else out
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config field {where} must be a mapping of {inner.__name__} fields")
        return from_dict(inner, value)
    if typing.get_origin(inner) is typing.Literal:
        if value not in typing.get_args(inner):
            raise UserError(f"config field {where} must be one of {', '.join(map(str, typing.get_args(inner)))}, "
                            f"not {value!r}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config field {where} must be true or false, not {value!r}")
    if inner is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, float)):
            raise UserError(f"config field {where} must be a whole number, not {value!r}")
        try:
            return int(value)
        except ValueError:
            raise UserError(f"config field {where} must be a whole number, not {value!r}") from None
    if inner is float:
        if isinstance(value, bool):
            raise UserError(f"config field {where} must be a number, not {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"config field {where} must be a number, not {value!r}") from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"config field {where} must be text, not {value!r}")
        return str(value)
    return value


# ---------------------------------------------------------------------------------- dict / file
class ConfigIO:
    """`to_dict` / `from_dict` methods for a config dataclass: JSON-able dict of every field and back
    (the module functions below)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (sightline.config.to_dict)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """The config a to_dict (or a saved config.json) describes."""
        return from_dict(cls, d)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Every field of a config, JSON-ready (tuples -> lists, nested dataclasses -> dicts)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def from_dict(cls: type, data: dict[str, Any], strict: bool = True) -> Any:
    """The config `data` describes (a saved config.json); unknown keys are a UserError when `strict`."""
    if not isinstance(data, dict):
        raise UserError(f"a {cls.__name__} config must be a mapping of field names to values")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown and strict:
        raise UserError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}; fields are {', '.join(names)}")
    values = {k: _convert(v, hints[k], k) for k, v in data.items() if k in names}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"{cls.__name__} needs {', '.join(missing)}")
    return cls(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config saved as JSON (.json) or YAML (.yaml/.yml); a run's config.json works as is."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; pass a JSON or YAML file (e.g. a run's config.json)")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise UserError(f"reading {p} needs PyYAML (pip install pyyaml), or give the config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise UserError(f"config file {p} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of field names to values")
    return data


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `to_dict(cfg)` as JSON (atomic); `--config` reads it back."""
    from sightline.report.files import write_json

    return write_json(path, to_dict(cfg))


# ---------------------------------------------------------------------------------- the CLI
@dataclass(frozen=True)
class FlagGroup:
    """Several flags that together build one field's value (e.g. an SAE grid from --arch --width --k).

    add(parser) adds the flags (dests must be unique); build(values) gets {dest: parsed value} of
    the flags given (absent ones are missing) and returns the field's value, or MISSING to keep
    the default / the --config file's value."""

    add: Callable[[argparse._ActionsContainer], None]
    build: Callable[[dict[str, Any]], Any]
    dests: tuple[str, ...]


def flag_name(name: str) -> str:
    """The flag of a field name: `l2_grid` -> `--l2-grid`."""
    return "--" + name.replace("_", "-")


def _value_parser(tp: Any, parse: Callable | None, where: str) -> Callable[[str], Any]:
    inner, optional = _unwrap_optional(tp)

    def one(text: str) -> Any:
        if optional and inner is not str and text.strip().lower() in _NONE_WORDS:
            return None
        if parse is not None:
            return parse(text)
        if inner is bool:
            return _convert(text, bool, where)
        if inner in (int, float):
            try:
                return inner(text)
            except ValueError:
                kind = "a whole number" if inner is int else "a number"
                raise argparse.ArgumentTypeError(f"{where} must be {kind}, not {text!r}") from None
        return text

    return one


def _walk(cls: type, prefix: str = ""):
    """(dotted name, field, type) of every field that gets flags; nested dataclasses are walked."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and "group" not in f.metadata and "parse" not in f.metadata:
            yield from _walk(inner, prefix + f.name + ".")
            continue
        yield prefix + f.name, f, tp


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        d = f.default
    elif f.default_factory is not MISSING:
        d = f.default_factory()
    else:
        return ""
    if isinstance(d, bool):
        return ""
    if isinstance(d, (tuple, list)):
        return " (default: " + (",".join(str(x) for x in d) if d else "none") + ")"
    if d is None or d == "":
        return ""
    return f" (default: {d})"


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of config class `cls` (see the module docstring), and --config."""
    docs_by_cls: dict[type, dict[str, str]] = {}

    def doc(owner: type, name: str) -> str:
        if owner not in docs_by_cls:
            docs_by_cls[owner] = field_docs(owner)
        return docs_by_cls[owner].get(name, "")

    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="start from a saved config (JSON or YAML, e.g. a run's config.json); flags override it")
    owners = _owners(cls)
    for dotted, f, tp in _walk(cls):
        meta = f.metadata
        owner = owners[dotted]
        text = doc(owner, f.name).replace("%", "%%")
        if "group" in meta:
            meta["group"].add(parser)
            continue
        inner, optional = _unwrap_optional(tp)
        required = f.default is MISSING and f.default_factory is MISSING
        help_text = (text + _default_text(f).replace("%", "%%")).strip() or None
        if meta.get("positional"):
            parser.add_argument(dotted, metavar=f.name.upper(), nargs="?", default=argparse.SUPPRESS,
                                type=_value_parser(tp, meta.get("parse"), f.name), help=help_text)
            continue
        flags = _flags(dotted, meta)
        kw: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS, "help": help_text}
        if required:
            kw["help"] = (help_text or "") + " (required)"
        item = _tuple_item(inner)
        if inner is bool and "parse" not in meta:
            kw["action"] = argparse.BooleanOptionalAction
        elif item is not None and "parse" not in meta:
            kw["nargs"] = "*"  # split on commas and converted in config_from_args
            kw["metavar"] = f.name.upper().split(".")[-1]
        else:
            kw["type"] = _value_parser(tp, meta.get("parse"), f.name)
            kw["metavar"] = f.name.upper()
            if typing.get_origin(inner) is typing.Literal:
                kw["choices"] = typing.get_args(inner)
                kw.pop("metavar")
        parser.add_argument(*flags, **kw)


def _owners(cls: type, prefix: str = "") -> dict[str, type]:
    """dotted field name -> the dataclass that declares it (for its docs)."""
    out: dict[str, type] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and "group" not in f.metadata and "parse" not in f.metadata:
            out.update(_owners(inner, prefix + f.name + "."))
        out[prefix + f.name] = cls
    return out


def config_from_args(cls: type, ns: argparse.Namespace | dict[str, Any]) -> Any:
    """Build the config from parsed flags: dataclass defaults <- --config file <- flags given."""
    given = dict(vars(ns) if isinstance(ns, argparse.Namespace) else ns)
    data: dict[str, Any] = {}
    if "config" in given:
        data = load_config_file(given.pop("config"))
        if "config" in data and isinstance(data["config"], dict) and not _has_field(cls, "config"):
            data = data["config"]  # a card/manifest that nests its config
    flat = given
    for dotted, f, tp in _walk(cls):
        meta = f.metadata
        if "group" in meta:
            vals = {d: flat.pop(d) for d in meta["group"].dests if d in flat}
            if vals:
                value = meta["group"].build(vals)
                if value is not MISSING:
                    _set(data, dotted, value)
            continue
        if dotted in flat:
            value = flat.pop(dotted)
            item = _tuple_item(_unwrap_optional(tp)[0])
            if item is not None and isinstance(value, list) and "parse" not in meta:
                split = [x.strip() for v in value for x in str(v).split(",")]  # "a,b" and "a b" both work
                value = tuple(_convert(v, item, flag_name(f.name)) for v in split if v != "")
            _set(data, dotted, value)
    missing = [flag_name(f.name) for f in dataclasses.fields(cls)
               if f.init and f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        raise UserError(f"{' and '.join(missing)} is required (give it as a flag or in --config)")
    return from_dict(cls, data)


def _has_field(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        sub = data.get(p)
        if dataclasses.is_dataclass(sub):
            sub = to_dict(sub)
        data[p] = dict(sub or {})
        data = data[p]
    data[parts[-1]] = value


def flags_of(cls: type) -> dict[str, tuple[str, ...]]:
    """dotted field name -> the flags that set it (for tests and docs)."""
    out: dict[str, tuple[str, ...]] = {}
    for dotted, f, _ in _walk(cls):
        meta = f.metadata
        if "group" in meta:
            out[dotted] = tuple(flag_name(d) for d in meta["group"].dests)
        elif meta.get("positional"):
            out[dotted] = (dotted,)
        else:
            out[dotted] = _flags(dotted, meta)
    return out


def _flags(dotted: str, meta) -> tuple[str, ...]:
    """A field's flags: its metadata's, else `--name` (`--outer.inner` for a nested field)."""
    return tuple(meta.get("flags") or ("--" + dotted.replace("_", "-"),))
