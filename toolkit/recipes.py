"""Training recipes: named sets of CoA-LoRA's experiment options, shipped as TOML files (``toolkit/recipe_files``)
or given as a user's own TOML file. ``coalora train`` starts from a recipe (``DEFAULT``, the one the quality
benchmark measured best) and explicit command-line options override its values.

A recipe file holds an optional ``description`` and any of the keys of :data:`KEYS`; an unknown key or a value
of the wrong kind is a one-line error.
"""
from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from converters.errors import CoaloraError
from converters.fileio import read_parsed

DEFAULT = "anchored"


def _choice(*allowed):
    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
        return v
    return check


def _number(lo: float, hi: float = float("inf"), kind=float):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise ValueError(f"must be {'an integer' if kind is int else 'a number'}")
        if not lo <= v <= hi:
            raise ValueError(f"must be in [{lo:g}, {hi:g}]")
        return kind(v)
    return check


def _quant_type_or_empty(v):
    if not isinstance(v, str):
        raise ValueError("must be a quant type name or \"\"")
    if not v:
        return ""
    from converters.quant_types import get
    return get(v).name


def _types(v):
    """"all", "" or a list (or comma-separated string) of quant types: kept as the comma-separated string the
    --type-deltas option takes."""
    if isinstance(v, str):
        v = [t.strip() for t in v.split(",") if t.strip()] if v.strip() != "all" else "all"
    if v == "all":
        return "all"
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise ValueError("must be \"all\" or a list of quant type names")
    return ",".join(_quant_type_or_empty(t) for t in v)


# key -> check; the keys are TrainOptions fields (type_deltas as the --type-deltas string)
KEYS = {
    "cam_lr": _number(0.0),
    "configs_per_step": _number(1, kind=int),
    "config_batch": _choice("split", "full"),
    "top_share": _number(0.0, 1.0),
    "low_share": _number(0.0, 1.0),
    "anchor": _quant_type_or_empty,
    "anchor_loss": _choice("kl", "ce"),
    "anchor_lora_weight": _number(0.0),
    "type_deltas": _types,
    "delta_lr": _number(0.0),
    "delta_error_power": _number(0.0),
}


def _shipped() -> dict[str, Path]:
    root = resources.files("toolkit") / "recipe_files"
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir() if e.name.endswith(".toml")}


def recipe_names() -> list[str]:
    return sorted(_shipped())


def load_recipe(name_or_path) -> dict:
    """The options of a shipped recipe (by name) or of a TOML file, checked; ``description`` left out."""
    s = str(name_or_path)
    shipped = _shipped()
    if s in shipped:
        path = shipped[s]
    elif s.endswith(".toml") or Path(s).is_file():
        path = Path(s)
    else:
        raise CoaloraError(f"unknown recipe {s!r}; known: {', '.join(sorted(shipped))} (or the path of a .toml file)")
    data = read_parsed(path, tomllib.loads, "TOML", "recipe")
    data.pop("description", None)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise CoaloraError(f"recipe {path}: unknown key {unknown[0]!r}; known: description, {', '.join(KEYS)}")
    out = {}
    for k, v in data.items():
        try:
            out[k] = KEYS[k](v)
        except (ValueError, CoaloraError) as e:
            raise CoaloraError(f"recipe {path}: {k} {e}") from None
    return out


def describe(name: str) -> str:
    path = _shipped()[name]
    return str(tomllib.loads(path.read_text()).get("description", ""))


def type_deltas(value: str, menu) -> tuple:
    """The quant types a --type-deltas value names ("all": the whole menu); each must be on the menu."""
    from converters.quant_types import get

    names = tuple(menu) if value.strip() == "all" else tuple(get(t.strip()).name for t in value.split(",") if t.strip())
    off = sorted(set(names) - set(menu))
    if off:
        raise CoaloraError(f"--type-deltas {','.join(off)}: not in --menu")
    return names


def train_options(name_or_path, menu) -> dict:
    """A recipe as TrainOptions keyword arguments for a run over ``menu`` (type_deltas spelled out)."""
    opts = load_recipe(name_or_path)
    opts["type_deltas"] = type_deltas(str(opts.get("type_deltas", "")), menu)
    return opts
