"""Named steering presets, selectable through the model name `<served-name>+<preset>`.

A gateway that forwards only `model` can route to a steering setting this way. The file is YAML
or JSON, either `{"presets": {NAME: {...}}}` or `{NAME: {...}}`, each entry holding the fields of
the request's `steering` object plus an optional `description`:

    presets:
      no-refusal:
        method: inlp_flip
        k: 2
        description: counterfactual flipping on the 2 leading INLP directions
      more-refusal:
        method: actadd
        strength: calibrated   # the pack's calibrated strength for the method (else 1)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from server.api.protocol import SteeringParams
from steering.interventions.catalog import BUILTIN_PRESETS, CALIBRATED

SEPARATOR = "+"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_PRESETS = BUILTIN_PRESETS


class PresetError(ValueError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    steering: SteeringParams
    description: str | None = None
    calibrated: bool = False  # strength: the pack's calibrated strength for the method


def parse_presets(data: object, source: str = "presets") -> dict[str, Preset]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PresetError(f"{source}: expected a mapping of preset names to settings")
    if set(data) == {"presets"} and isinstance(data["presets"], dict | None):
        data = data["presets"] or {}
    out: dict[str, Preset] = {}
    for name, entry in data.items():
        name = str(name)
        if not NAME_RE.match(name):
            raise PresetError(f"{source}: preset name {name!r} must be 1–64 letters, digits, "
                              "'.', '_' or '-' (and no '+')")
        if not isinstance(entry, dict):
            raise PresetError(f"{source}: preset {name!r} must be a mapping")
        entry = dict(entry)
        description = entry.pop("description", None)
        calibrated = entry.get("strength") == CALIBRATED
        if calibrated:
            entry["strength"] = 1.0  # the paper's strength where a pack records no calibration
        try:
            steering = SteeringParams.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            raise PresetError(f"{source}: preset {name!r} is invalid ({problems})") from None
        out[name] = Preset(name, steering, str(description) if description else None,
                           calibrated)
    return out


def load_presets(path: str | Path | None, include_defaults: bool = True) -> dict[str, Preset]:
    """The built-in presets (unless disabled), overridden and extended by `path`'s."""
    presets = parse_presets(DEFAULT_PRESETS, "built-in presets") if include_defaults else {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise PresetError(f"presets file {p} does not exist")
        text = p.read_text()
        try:
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise PresetError(f"presets file {p} cannot be parsed ({exc})") from None
        presets.update(parse_presets(data, str(p)))
    return presets


def split_model_name(model: str) -> tuple[str, str | None]:
    """`"base+preset"` → ("base", "preset"); `"base"` → ("base", None)."""
    base, sep, preset = model.rpartition(SEPARATOR)
    if not sep:
        return model, None
    return base, preset
