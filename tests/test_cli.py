"""The generated CLI: every config field has a flag and help, defaults come only from the configs,
`--config` round-trips, and `sightline --help` stays import-light."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from sightline.cli import COMMANDS, build_parser, main
from sightline.config import (
    config_from_args,
    field_docs,
    flags_of,
    from_dict,
    load_config_file,
    to_dict,
)
from sightline.errors import UserError

WITH_CONFIG = sorted(name for name, c in COMMANDS.items() if c.config is not None)
# values for required fields (no default), so that a config can be built without a real model
REQUIRED = {"model": "m", "data": "d", "out": "o", "store": "s", "image": "i.png", "path": "p", "directions": "dirs",
            "saes": ("sae-a", "sae-b"), "sae": "sae-a", "site": "resid.1", "runs": ("run-a", "run-b"),
            "scores": (61.5, 58.0)}


def _config_class(name):
    parser, cls = build_parser(name)
    return parser, cls


def _required_args(cls) -> list[str]:
    args: list[str] = []
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            value = REQUIRED[f.name]
            if f.metadata.get("positional"):
                args.insert(0, str(value))
            else:
                flag = flags_of(cls)[f.name][0]
                args += [flag, *(map(str, value) if isinstance(value, tuple) else [value])]
    return args


def _walk_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else None
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub) and "group" not in f.metadata and "parse" not in f.metadata:
            yield from _walk_fields(type(sub), prefix + f.name + ".")
        else:
            yield prefix + f.name, f, t


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_every_field_has_a_flag_with_help(name):
    parser, cls = _config_class(name)
    option_strings = {s for a in parser._actions for s in a.option_strings} | {a.dest for a in parser._actions}
    flags = flags_of(cls)
    for dotted, f, _ in _walk_fields(cls):
        assert dotted in flags, f"{name}: field {dotted} has no flag"
        for flag in flags[dotted]:
            assert flag in option_strings or flag.lstrip("-").replace("-", "_") in option_strings, (name, flag)
        owner = cls
        for part in dotted.split(".")[:-1]:
            owner = type(getattr(owner(**_defaults_for(owner)), part))
        assert field_docs(owner).get(f.name), f"{name}: field {dotted} has no docstring"


def _defaults_for(cls) -> dict:
    return {f.name: REQUIRED[f.name] for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


@pytest.mark.parametrize("name", WITH_CONFIG)
def test_defaults_come_from_the_config(name):
    """Parsing only the required flags gives exactly the dataclass defaults: no default lives in cli.py."""
    parser, cls = _config_class(name)
    cfg = config_from_args(cls, parser.parse_args(_required_args(cls)))
    expected = from_dict(cls, to_dict(cls(**_defaults_for(cls))))
    assert cfg == expected


@pytest.mark.parametrize("name", WITH_CONFIG)
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_config_file_round_trip(name, fmt, tmp_path):
    """to_dict -> file -> --config gives back an equal config; a flag given beside it overrides the file."""
    parser, cls = _config_class(name)
    cfg = cls(**_defaults_for(cls))
    # change every simple field away from its default, so that the round trip is not trivially the defaults
    changes = {}
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if isinstance(v, bool):
            changes[f.name] = not v
        elif isinstance(v, int) and f.name not in ("n_layers",):
            changes[f.name] = v + 3
        elif isinstance(v, float):
            changes[f.name] = v / 2 + 0.125
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except UserError:  # a validating config: keep its defaults
        pass
    path = tmp_path / f"cfg.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(to_dict(cfg)))
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config_file(path) == to_dict(cfg)
    back = config_from_args(cls, parser.parse_args(["--config", str(path)]))
    assert back == cfg
    # a flag beside --config wins over the file
    int_field = next((f for f in dataclasses.fields(cls) if type(getattr(cfg, f.name)) is int
                      and "group" not in f.metadata), None)
    if int_field is not None:
        flag = flags_of(cls)[int_field.name][0]
        over = config_from_args(cls, parser.parse_args(["--config", str(path), flag, "41"]))
        assert getattr(over, int_field.name) == 41
        assert dataclasses.replace(over, **{int_field.name: getattr(cfg, int_field.name)}) == cfg


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "m", "data": "d", "out": "o", "batch_sise": 3}')
    assert main(["extract", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_sise" in err[0] and "batch_size" in err[0]
    assert main(["extract", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["extract", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model is required" in err[0]
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_tuples_take_commas_or_several_values():
    parser, cls = _config_class("probe")
    a = config_from_args(cls, parser.parse_args(["s", "--drop-classes", "a,b", "--l2", "0.1", "0.01"]))
    b = config_from_args(cls, parser.parse_args(["s", "--drop-classes", "a", "b", "--l2", "0.1,0.01"]))
    assert a == b and a.drop_classes == ("a", "b") and a.l2_grid == (0.1, 0.01)


def test_help_is_import_light():
    """`sightline --help` imports neither torch nor transformers (that is what keeps it under a second)."""
    code = ("import sys; from sightline.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip().splitlines()[-1] == "[]"
    for name in COMMANDS:
        assert name.split(" ")[-1] in r.stdout


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*name.split(" "), "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"sightline {name}" in out


def test_inspect_is_a_library_function(tiny_checkpoint, tmp_path, capsys):
    """`sightline inspect --json` prints exactly what `inspect_layout` returns."""
    from conftest import gradient_image

    from sightline.inspection import InspectConfig, format_layout, inspect_layout

    img = tmp_path / "im.png"
    gradient_image(64, 80).save(img)
    cfg = InspectConfig(model=tiny_checkpoint("llava"), image=str(img), prompt="What is shown?")
    info = inspect_layout(cfg)
    assert main(["inspect", "--model", cfg.model, "--image", cfg.image, "--prompt", cfg.prompt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(info))
    assert info["tokens"]["image"] == info["grids"][0]["rows"] * info["grids"][0]["cols"]
    assert "image at   positions" in format_layout(info)
