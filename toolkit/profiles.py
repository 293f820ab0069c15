"""Device profiles: the TOML files shipped in the ``device_profiles`` package, or a user's own TOML file.

A profile says how much memory a device has, what share of it the llama.cpp process may take, how it
runs llama.cpp (context, threads, ubatch, KV cache type, flash attention) and which quant types suit
its CPU. ``Profile.model_budget_bytes(layout)`` is what is left for the model file once the adapter,
the KV cache, the compute buffers and the runtime are paid for (see :mod:`toolkit.memory_model`),
capped by the profile's optional explicit ``model_budget_bytes``. :func:`plan_budget` is the one place
that plans a trained run's budget on a device (``coalora search --profile`` and ``coalora emit``).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from converters.configuration import Configuration
from converters.quant_types import CATALOGUE_NAMES, IMATRIX_NAMES
from toolkit import limits
from toolkit import memory_model as mm
from toolkit.limits import Limit
from converters.errors import CoaloraError
from converters.fileio import read_parsed

REQUIRED = ("name", "description", "memory_bytes", "model_share", "context_length", "threads")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    memory_bytes: int
    model_share: float
    context_length: int
    threads: int
    kv_cache_type: str = "f16"
    ubatch: int = 512
    flash_attn: bool = False
    prefer: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    model_budget_cap: int | None = None   # the TOML's model_budget_bytes
    source: str = field(default="", compare=False)

    @property
    def process_budget_bytes(self) -> int:
        """Memory the whole llama.cpp process may use on this device."""
        return int(self.memory_bytes * self.model_share)

    def memory(self, arch: mm.ArchInfo, model_bytes: int, adapter_bytes: int, repack: int = 0) -> mm.MemoryEstimate:
        """``repack``: mm.repack_bytes() of the configuration, once it is known."""
        return mm.estimate(arch, model_bytes, adapter_bytes, self.context_length, self.kv_cache_type,
                           self.ubatch, self.flash_attn, repack=repack)

    def model_budget_bytes(self, layout, arch: mm.ArchInfo | None = None, adapter_bytes: int | None = None,
                           rank: int = 16, targets=None) -> int:
        """Bytes available for the model file. ``adapter_bytes`` defaults to an F32 LoRA of ``rank``."""
        arch = arch or mm.ArchInfo.from_layout(layout)
        if adapter_bytes is None:
            adapter_bytes = mm.adapter_bytes_estimate(layout, rank, targets)
        rest = self.memory(arch, 0, adapter_bytes).total
        budget = self.process_budget_bytes - rest
        if self.model_budget_cap is not None:
            budget = min(budget, self.model_budget_cap)
        if budget <= 0:
            raise CoaloraError(f"profile {self.name}: the adapter, KV cache and compute buffers for a context of "
                               f"{self.context_length} already take {rest / mm.MiB:.0f} MiB of the "
                               f"{self.process_budget_bytes / mm.MiB:.0f} MiB the profile allows")
        return int(budget)

    def llama_args(self) -> list[str]:
        """llama-cli / llama-server options this profile runs with (besides -m and --lora)."""
        args = ["-c", str(self.context_length), "-t", str(self.threads), "-b", str(self.ubatch),
                "-ub", str(self.ubatch), "-ctk", self.kv_cache_type, "-ctv", self.kv_cache_type,
                "-fa", "on" if self.flash_attn else "off"]
        return args

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_budget_bytes"] = d.pop("model_budget_cap")
        d["prefer"], d["avoid"] = list(self.prefer), list(self.avoid)
        d["process_budget_bytes"] = self.process_budget_bytes
        return d


@dataclass(frozen=True)
class BudgetPlan:
    """A run's model budget on a device: what ``search --profile`` and ``emit`` both search within."""
    budget_bytes: int       # model file bytes, never above the largest configuration of ``layout``
    layout: object          # the run's ModelLayout with the profile's avoided quant types off the menu
    arch: mm.ArchInfo
    adapter_bytes: int      # the F32 LoRA GGUF of the run's rank and targets that the budget leaves room for


def plan_budget(profile: Profile, layout, rank: int, targets) -> BudgetPlan:
    """The model budget of a run (its ``layout``, LoRA ``rank`` and ``targets`` kinds) on ``profile``'s device;
    room beyond the largest configuration of the profile's menu is left unused."""
    arch = mm.ArchInfo.from_layout(layout)
    adapter = mm.adapter_bytes_estimate(layout, int(rank), targets)
    budget = profile.model_budget_bytes(layout, arch, adapter)
    slayout = layout
    if profile.avoid:
        menu = tuple(m for m in layout.menu_names if m not in profile.avoid)
        if not menu:
            raise CoaloraError(f"profile {profile.name} avoids every quant type of the run's menu "
                               f"({', '.join(layout.menu_names)})")
        slayout = layout.with_menu(menu)
    largest = {n: max(slayout.menu(n), key=lambda q: slayout[n].bytes(q)) for n in slayout.names()}
    budget = min(budget, slayout.file_bytes(Configuration(largest)))
    return BudgetPlan(int(budget), slayout, arch, adapter)


def plan_run_budget(profile: Profile, run_meta: dict, layout) -> BudgetPlan:
    """:func:`plan_budget` from a run's run.json (its rank and targets as trained)."""
    o = run_meta.get("options") or {}
    if "rank" not in o:
        raise CoaloraError("the run records no LoRA rank (an incomplete run.json); cannot size its adapter for a "
                           "profile's budget: use --budget-bytes or --bpw")
    return plan_budget(profile, layout, o["rank"], o.get("targets") or None)


# Profile names become folder names (DIST/NAME): a plain name, never a path.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The TOML keys and their types / ranges (a string, a bool, a list of quant type names, or a limits.Limit).
FIELDS = {"name": str, "description": str, "memory_bytes": Limit(1, 2**50), "model_share": Limit(0, 1, False, True),
          "context_length": Limit(1, 1 << 20), "threads": limits.THREADS, "kv_cache_type": str,
          "ubatch": Limit(1, 1 << 16), "flash_attn": bool, "prefer": list, "avoid": list,
          "model_budget_bytes": Limit(1, 2**50)}


def _check_fields(data: dict, source: str) -> None:
    """Every key known and of its type: ``flash_attn = "false"`` is an error, not true; ``threads = true``,
    ``"4"``, ``1.5`` or ``inf`` are errors, not 1 or 4."""
    if not isinstance(data, dict):
        raise CoaloraError(f"profile {source}: not a TOML table")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise CoaloraError(f"profile {source} lacks {', '.join(missing)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise CoaloraError(f"profile {source}: unknown key {unknown[0][:60]!r}")
    for key, kind in FIELDS.items():
        if key not in data:
            continue
        v = data[key]
        if isinstance(kind, Limit):
            problem = kind.check(v)
        elif kind is list:
            problem = None if isinstance(v, list) and all(isinstance(q, str) for q in v) else "must be a list of quant type names"
        else:
            problem = None if isinstance(v, kind) else f"must be a {'string' if kind is str else 'boolean (true or false)'}"
        if problem:
            raise CoaloraError(f"profile {source}: {key} {problem}")
    if not NAME.fullmatch(data["name"]):
        raise CoaloraError(f"profile {source}: name {data['name'][:60]!r} must be 1-64 letters, digits, '.', '_' or "
                           f"'-', starting with a letter or digit (it names the profile's output folder)")


def _parse(data: dict, source: str) -> Profile:
    _check_fields(data, source)
    p = Profile(name=data["name"], description=data["description"], memory_bytes=data["memory_bytes"],
                model_share=float(data["model_share"]), context_length=data["context_length"],
                threads=data["threads"], kv_cache_type=data.get("kv_cache_type", "f16").lower(),
                ubatch=data.get("ubatch", 512), flash_attn=data.get("flash_attn", False),
                prefer=tuple(q.upper() for q in data.get("prefer", ())),
                avoid=tuple(q.upper() for q in data.get("avoid", ())),
                model_budget_cap=data.get("model_budget_bytes"), source=source)
    mm.kv_bytes_per_element(p.kv_cache_type)
    if p.kv_cache_type not in ("f16", "f32", "bf16") and not p.flash_attn:
        raise CoaloraError(f"profile {source}: a {p.kv_cache_type} KV cache needs flash_attn = true in llama.cpp")
    bad = [q for q in p.prefer + p.avoid if q not in CATALOGUE_NAMES + IMATRIX_NAMES]
    if bad:
        raise CoaloraError(f"profile {source}: unknown quant type {bad[0][:40]!r}")
    if set(CATALOGUE_NAMES) <= set(p.avoid):
        raise CoaloraError(f"profile {source}: avoid lists every quant type; nothing would be left to choose")
    return p


def _shipped() -> dict[str, Path]:
    root = resources.files("device_profiles")
    return {Path(e.name).stem: Path(str(e)) for e in root.iterdir() if e.name.endswith(".toml")}


def list_profiles() -> list[Profile]:
    return [load_profile(p) for _, p in sorted(_shipped().items())]


def profile_names() -> list[str]:
    return sorted(_shipped())


def load_profile(name_or_path) -> Profile:
    """A shipped profile by name, or any TOML file by path."""
    s = str(name_or_path)
    path = Path(s)
    if not (s.endswith(".toml") or path.is_file()):
        shipped = _shipped()
        if s not in shipped:
            raise CoaloraError(f"unknown device profile {s!r}; known: {', '.join(sorted(shipped))} "
                               f"(or give the path of a .toml file)")
        path = shipped[s]
    data = read_parsed(path, tomllib.loads, "TOML", "profile")
    return _parse(data, str(path))
