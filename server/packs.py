"""Extra packs from `STEER_PACKS_DIR` (every NAME.safetensors with its NAME.json) and
`STEER_EXTRA_PACKS` (comma-separated paths), each checked against the served model.

A pack that is corrupt, truncated, pickled, or made for another model is refused with the loader's
message, logged and skipped: the server serves the others and lists it as failed in
`GET /v1/steering/packs`. Names come from file names and must be plain names (no paths).
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.security.hardening import valid_name
from steering.packs.format import PackError, SteeringPack, load_pack

log = logging.getLogger("server")


def _candidates(settings) -> list[Path]:
    paths: list[Path] = []
    if settings.packs_dir:
        folder = Path(settings.packs_dir)
        if folder.is_dir():
            paths += sorted(folder.glob("*.safetensors"))
        else:
            log.error("packs_dir %s is not a folder", folder)
    if settings.extra_packs:
        paths += [Path(p.strip()) for p in settings.extra_packs.split(",") if p.strip()]
    return paths


def load_extra_packs(settings, model, taken: set[str]) -> tuple[dict[str, SteeringPack],
                                                                dict[str, str]]:
    """(loaded packs by name, failed packs: name → reason)."""
    loaded: dict[str, SteeringPack] = {}
    failed: dict[str, str] = {}
    for path in _candidates(settings):
        name = path.name.removesuffix(".safetensors").removesuffix(".json")
        if not valid_name(name):
            failed[name[:64]] = f"invalid pack name {name!r} (letters, digits, '.', '_', '-')"
        elif name in taken or name in loaded:
            failed[name] = f"a pack named {name!r} is already loaded"
        else:
            try:
                loaded[name] = load_pack(path, model=model, name=name)
                continue
            except PackError as exc:
                failed[name] = str(exc)
            except Exception as exc:  # anything else a broken file can raise
                failed[name] = f"{type(exc).__name__}: {exc}"
        log.error("pack %s refused: %s", path, failed.get(name) or failed.get(name[:64]))
    return loaded, failed
