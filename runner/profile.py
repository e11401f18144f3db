"""Profiles: loading a run's settings from TOML, by name or path, with overrides and variants.

Owns: finding a profile (shipped in profiles/ by name, or a path), `load_profile` (TOML, then the
`--set section.key=value` overrides, then validation once, at load), the variants of an experiment
(`[[variants]]` tables: a name plus overrides of the base profile's keys, each validated as a profile
of its own), blaming an invalid value on the flag that gave it, and the overrides that
RELAY_TEST_TINY_MODEL stands for. Nothing deeper re-checks configuration.

The schema (the dataclasses and the fingerprint) is runner.profileschema's; the checks of keys and
values are runner.profilecheck's. Both are importable from here, where the rest of Relay imports
them. Imports nothing above errors.py.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

from runner.errors import ProfileError
from runner.profilecheck import apply_override, build_profile
from runner.profileschema import (
    SECTIONS,
    CheckpointConfig,
    DashboardConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    Profile,
    PublishConfig,
    SampleConfig,
    SessionConfig,
    TrainConfig,
    diff_fields,
    fingerprint,
    fingerprint_fields,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (older notebook images)
    import tomli as tomllib

__all__ = [
    "PROFILES_DIR", "TEST_TINY_ENV", "VARIANT_SEPARATOR",
    "CheckpointConfig", "DashboardConfig", "DataConfig", "LoraConfig", "ModelConfig", "Profile", "PublishConfig",
    "SampleConfig", "SessionConfig", "TrainConfig",
    "apply_override", "build_profile", "diff_fields", "fingerprint", "fingerprint_fields", "list_profiles",
    "load_profile", "resolve_profile_path", "test_tiny_overrides",
]  # fmt: skip

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
VARIANTS_KEY = "variants"
VARIANT_SEPARATOR = "--"  # a variant's run is EXPERIMENT--VARIANT
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def list_profiles(directory: Path = PROFILES_DIR) -> list[tuple[str, str]]:
    """(name, description) of every profile shipped in `directory`."""
    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            desc = str(tomllib.loads(path.read_text()).get("description", ""))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            desc = f"(unreadable: {exc})"
        out.append((path.stem, desc))
    return out


def resolve_profile_path(name_or_path: str, directory: Path = PROFILES_DIR) -> Path:
    """A profile given by name (shipped in profiles/) or by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or "/" in name_or_path:
        if not path.is_file():
            raise ProfileError(
                f"profile file not found: {path}", hint="give a path to a .toml file or a name from `relay profiles`"
            )
        return path
    shipped = directory / f"{name_or_path}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(n for n, _ in list_profiles(directory)) or "none"
    raise ProfileError(
        f"no profile named {name_or_path!r}", hint=f"shipped profiles: {names}; or give a path to a .toml file"
    )


TEST_TINY_ENV = "RELAY_TEST_TINY_MODEL"
"""Tests only: a target step count N. Every profile then trains the tiny model on a few generated images at 32 px
for N steps; its name, run key and effective batch stay as shipped (docs/platforms.md, "Testing what ships")."""


def test_tiny_overrides(value: str) -> list[str]:
    """The --set items RELAY_TEST_TINY_MODEL=N stands for (none when it is unset or empty)."""
    if not value.strip():
        return []
    if not value.strip().isdigit() or int(value) < 1:
        raise ProfileError(f"must be a positive step count, not {value!r}", path=f"${TEST_TINY_ENV}")
    return ["model.base=tiny", "model.vae=", "model.variant=", "model.revision=", "data.source=generated",
            "data.generated_count=4", "data.validation_count=0", "data.limit=0", "train.resolution=32",
            f"train.steps={int(value)}", "train.warmup_steps=0", "sample.inference_steps=1"]  # fmt: skip


def load_profile(
    name_or_path: str, overrides: list[str] = (), directory: Path = PROFILES_DIR, *, flags: dict[str, str] | None = None
) -> Profile:
    """Load, override and validate a profile. Raises ProfileError naming the file and key, or for a value
    that came from the command line, the flag: `--set KEY=VALUE`, or `flags[KEY]` (e.g. "--hours 0.5")."""
    path = resolve_profile_path(name_or_path, directory)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"not valid TOML: {exc}", path=str(path)) from None
    except OSError as exc:
        raise ProfileError(f"cannot read: {exc.strerror}", path=str(path)) from None
    raw.setdefault("name", path.stem)
    variant_tables = raw.pop(VARIANTS_KEY, None)
    file_raw = copy.deepcopy(raw)  # the file's own settings: each variant overrides these, then --set applies
    origins = {}
    overrides = [*test_tiny_overrides(os.environ.get(TEST_TINY_ENV, "")), *overrides]
    for item in overrides:
        apply_override(raw, item)
        key = item.partition("=")[0].strip()
        origins[key] = (flags or {}).get(key, f"--set {item.strip()}")
    base = _build_blamed(raw, str(path), origins)
    if variant_tables is None:
        return base
    variants = []
    for name, table in _variant_tables(variant_tables, str(path)):
        vraw = _merged(copy.deepcopy(file_raw), table)
        vraw["run"] = f"{base.run_name}{VARIANT_SEPARATOR}{name}"
        for item in overrides:
            apply_override(vraw, item)
        try:
            variant = _build_blamed(vraw, str(path), origins)
        except ProfileError as exc:
            where = exc.path if exc.path != str(path) else f"{path}: variant {name!r}"
            raise ProfileError(exc.detail, path=where, key=exc.key, hint=exc.hint) from None
        variants.append(dataclasses.replace(variant, variant=name))
    return dataclasses.replace(base, variants=tuple(variants))


def _build_blamed(raw: dict[str, Any], source: str, origins: dict[str, str]) -> Profile:
    """build_profile; an error about a value given on the command line names that flag, not the file."""
    try:
        return build_profile(raw, source=source)
    except ProfileError as exc:
        flag = next((f for k, f in origins.items() if exc.key and (k == exc.key or k.startswith(exc.key + "."))), None)
        if flag is None:
            raise
        raise exc.blamed_on(flag) from None


def _variant_tables(tables: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    """(name, overrides) of each `[[variants]]` table, checked for shape; the values are checked when each
    variant is built as a profile of its own."""
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ProfileError("must be one or more [[variants]] tables", path=source, key=VARIANTS_KEY,
                           hint='e.g. [[variants]] name = "dropout" lora.dropout = 0.5')  # fmt: skip
    out: list[tuple[str, dict[str, Any]]] = []
    for n, table in enumerate(tables, start=1):
        name = table.get("name")
        where = f"{source}: variant {name!r}" if isinstance(name, str) else f"{source}: variant #{n}"
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or VARIANT_SEPARATOR in name:
            raise ProfileError(f"needs a name of letters, digits, '_', '.' or '-', got {name!r}", path=where,
                               key="name", hint='e.g. name = "dropout-0.5" (it names the run: EXPERIMENT--NAME)')  # fmt: skip
        if name in (seen for seen, _ in out):
            raise ProfileError("two variants have this name", path=where, key="name", hint="give each its own name")
        overrides = {k: v for k, v in table.items() if k != "name"}
        for key, value in overrides.items():
            if key in ("run", "name"):
                raise ProfileError("a variant cannot set this", path=where, key=key,
                                   hint="its run is named after the experiment and the variant")  # fmt: skip
            if key in SECTIONS and not isinstance(value, dict):
                raise ProfileError(f"must be a table of {key}.* keys", path=where, key=key)
        out.append((name, overrides))
    return out


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with each section's keys replaced by the variant's (the other keys of the section kept)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base
