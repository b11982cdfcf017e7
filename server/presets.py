"""Named steering presets, selectable through the model name `<served-name>+<preset>`.

A gateway that forwards only `model` can route to a steering setting this way. The file is YAML
or JSON, either `{"presets": {NAME: {...}}}` or `{NAME: {...}}`, each entry holding the fields of
the request's `steering` object plus an optional `description`:

    presets:
      flip-k2:
        method: inlp_flip
        k: 2
        description: counterfactual flipping on the 2 leading INLP directions
      more-refusal:
        method: actadd
        strength: calibrated   # the pack's calibrated strength for the method (else 1)
      ablate-then-refuse:      # a list: `steering` holds the objects, applied in order
        steering:
          - {method: ablate}
          - {method: actadd, strength: calibrated, apply_to: generation, when: {above: 0.5}}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from steering.catalog import BUILTIN_PRESETS, CALIBRATED
from steering.interventions.schema import SteeringObject as SteeringParams
from steering.interventions.schema import SteeringValue

SEPARATOR = "+"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_PRESETS = BUILTIN_PRESETS


class PresetError(ValueError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    steering: SteeringValue  # one object, or a list
    description: str | None = None
    calibrated: bool = False  # strength: the pack's calibrated strength for the method
    calibrated_parts: tuple[bool, ...] = ()  # the same per object of a list

    @property
    def parts(self) -> list[SteeringParams]:
        return self.steering if isinstance(self.steering, list) else [self.steering]

    def is_calibrated(self, index: int) -> bool:
        """Whether object `index` takes the pack's calibrated strength."""
        return self.calibrated_parts[index] if self.calibrated_parts else self.calibrated


def _steering_object(entry: object, name: str, source: str) -> tuple[SteeringParams, bool]:
    if not isinstance(entry, dict):
        raise PresetError(f"{source}: preset {name!r} must be a mapping")
    entry = dict(entry)
    calibrated = entry.get("strength") == CALIBRATED
    if calibrated:
        entry["strength"] = 1.0  # the paper's strength where a pack records no calibration
    try:
        return SteeringParams.model_validate(entry), calibrated
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise PresetError(f"{source}: preset {name!r} is invalid ({problems})") from None


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
        description = str(description) if description else None
        listed = entry.pop("steering", None)
        if listed is None:
            steering, calibrated = _steering_object(entry, name, source)
            out[name] = Preset(name, steering, description, calibrated)
            continue
        if entry or not isinstance(listed, list) or not listed:
            raise PresetError(f"{source}: preset {name!r}: 'steering' must be a non-empty list "
                              "of steering objects, with no other field beside 'description'")
        parts = [_steering_object(e, f"{name}[{i}]", source) for i, e in enumerate(listed)]
        out[name] = Preset(name, [p for p, _ in parts], description,
                           any(c for _, c in parts), tuple(c for _, c in parts))
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
