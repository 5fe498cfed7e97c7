"""Hardware profiles: a machine's peak compute, memory and interconnect, read from a data file.

The built-in profiles are TOML files in `largebatch/plan/profiles/` (one per machine, each value with its public
source in a comment); `largebatch plan --calibrate` writes a JSON profile of the machine it runs on, measured. Both
are read by `load_profile(name_or_path)`. The schema is `Profile` (the one statement of it):

    name, description       who it is
    kind                    "accelerator" or "cpu" (picks the assumed efficiency below, unless the file states one)
    peak_flops              FLOP/s per chip at the training precision (datasheet)
    memory_bytes            memory per chip; memory_bandwidth: bytes/s per chip (the optimizer step is memory-bound)
    grad_bytes              bytes per gradient element on the wire (2: bf16/fp16, 4: fp32)
    topology                how the gradient all-reduce runs (one of `comm.TOPOLOGIES`)
    chips_per_node          chips sharing the first (fast) level of the interconnect
    levels                  [{name, bandwidth (bytes/s per chip per direction), latency (s)}], fastest first
    torus                   [a, b]: the 2-D torus of a torus2d machine
    efficiency, half_batch  optional: sustained fraction of peak at large per-chip batch, and the per-chip batch at
                            which half of it is reached (measured profiles state them; the datasheet ones do not)
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from largebatch.config import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

ASSUMED: dict[str, tuple[float, float]] = {"accelerator": (0.2, 16.0), "cpu": (0.2, 4.0)}
"""(efficiency, half_batch) assumed for a datasheet profile of each kind: one value for every machine of the kind,
never fitted to a result (docs/plan.md says how it compares with the published runs)."""


@dataclass(frozen=True)
class Level:
    """One level of the interconnect: bandwidth in bytes/s per chip and direction, latency (alpha) in seconds."""

    name: str
    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Profile:
    """A machine (see the module docstring for each field)."""

    name: str
    peak_flops: float
    levels: tuple[Level, ...]
    topology: str = "ring"
    kind: str = "accelerator"
    description: str = ""
    memory_bytes: float = 0.0
    memory_bandwidth: float = 0.0
    grad_bytes: int = 4
    chips_per_node: int = 1
    torus: tuple[int, int] | None = None
    efficiency: float | None = None
    half_batch: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def sustained(self) -> tuple[float, float]:
        """(efficiency, half_batch): the profile's own, else the assumption for its kind (`ASSUMED`)."""
        eff, half = ASSUMED[self.kind]
        return (self.efficiency if self.efficiency is not None else eff,
                self.half_batch if self.half_batch is not None else half)


def _positive(value: object, what: str, where: str, fix: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {what} = {value!r} is invalid: {fix}")
    return float(value)


def profile_from_dict(data: dict, where: str) -> Profile:
    """A validated `Profile` from the parsed file `where`; ConfigError naming the field and the fix otherwise."""
    from largebatch.plan.comm import TOPOLOGIES

    known = {f for f in Profile.__dataclass_fields__} - {"extra"}
    unknown = sorted(set(data) - known - {"sources", "measured"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; a profile has {', '.join(sorted(known))}")
    for key in ("name", "peak_flops", "levels"):
        if key not in data:
            raise ConfigError(f"{where}: missing {key}; a profile needs name, peak_flops and levels")
    _positive(data["peak_flops"], "peak_flops", where, "give the chip's peak FLOP/s, > 0")
    if data.get("topology", "ring") not in TOPOLOGIES:
        raise ConfigError(f"{where}: topology {data.get('topology')!r} is unknown: use one of {', '.join(TOPOLOGIES)}")
    if data.get("kind", "accelerator") not in ASSUMED:
        raise ConfigError(f"{where}: kind {data.get('kind')!r} is unknown: use one of {', '.join(ASSUMED)}")
    if not isinstance(data["levels"], list) or not data["levels"]:
        raise ConfigError(f"{where}: levels must be a non-empty list of {{name, bandwidth, latency}}")
    levels = []
    for i, lv in enumerate(data["levels"]):
        name = lv.get("name", f"level {i}")
        bw = _positive(lv.get("bandwidth"), f"levels[{i}] ({name}).bandwidth", where,
                       "give the link bandwidth in bytes/s per chip, > 0 (zero bandwidth never finishes)")
        lat = lv.get("latency", 0.0)
        if not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat < 0:
            raise ConfigError(f"{where}: levels[{i}] ({name}).latency = {lat!r} is invalid: give seconds, >= 0")
        levels.append(Level(name, bw, float(lat)))
    topology = data.get("topology", "ring")
    if topology == "hierarchical" and len(levels) < 2:
        raise ConfigError(f"{where}: a hierarchical topology needs two levels (intra-node first, then inter-node)")
    torus = tuple(data["torus"]) if data.get("torus") else None
    if topology == "torus2d" and (torus is None or len(torus) != 2 or min(torus) < 1):
        raise ConfigError(f"{where}: a torus2d topology needs torus = [a, b], the chips along each dimension")
    if data.get("efficiency") is not None:
        _positive(data["efficiency"], "efficiency", where, "give a fraction of peak in (0, 1], or leave it out")
    half = data.get("half_batch")
    if half is not None and (not isinstance(half, (int, float)) or not math.isfinite(half) or half < 0):
        raise ConfigError(f"{where}: half_batch = {half!r} is invalid: give examples per chip, >= 0, or leave it out")
    if data.get("efficiency") is not None and data["efficiency"] > 1:
        raise ConfigError(f"{where}: efficiency = {data['efficiency']} is invalid: a fraction of peak, in (0, 1]")
    return Profile(name=str(data["name"]), peak_flops=float(data["peak_flops"]), levels=tuple(levels),
                   topology=topology, kind=data.get("kind", "accelerator"), description=data.get("description", ""),
                   memory_bytes=float(data.get("memory_bytes", 0.0)),
                   memory_bandwidth=float(data.get("memory_bandwidth", 0.0)),
                   grad_bytes=int(data.get("grad_bytes", 4)), chips_per_node=int(data.get("chips_per_node", 1)),
                   torus=torus, efficiency=data.get("efficiency"), half_batch=data.get("half_batch"),
                   extra={k: data[k] for k in ("sources", "measured") if k in data})


def builtin_profiles() -> list[str]:
    """Names of the built-in profiles (the TOML files in PROFILE_DIR)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """The built-in profile `name`, or the profile file at a path (.toml or .json, e.g. from --calibrate)."""
    text = str(name_or_path)
    path = PROFILE_DIR / f"{text}.toml" if text in builtin_profiles() else Path(text)
    if not path.is_file():
        raise ConfigError(f"--profile {text}: no such built-in profile or file; choose one of "
                          f"{', '.join(builtin_profiles())}, or a file written by `largebatch plan --calibrate`")
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--profile {path}: not a valid {path.suffix[1:] or 'profile'} file ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--profile {path}: expected an object of profile fields")
    return profile_from_dict(data, f"profile {path}")
