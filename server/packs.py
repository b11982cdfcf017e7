"""Extra packs from `STEER_PACKS_DIR` (every NAME.safetensors with its NAME.json) and
`STEER_EXTRA_PACKS` (comma-separated paths), each checked against the served model; packs
uploaded or deleted while serving (`server.api.pack_admin`) go through `load_pack_bytes`,
`install_pack` and `remove_pack` here, with the same validation.

The packs loaded at start (the default pack, the shipped concept packs, `STEER_PACKS_DIR` and
`STEER_EXTRA_PACKS`) are pinned (`state.pinned_packs`): they cannot be replaced or deleted while
serving. An upload is also checked against the shipped refusal pack
(`steering.packs.consistency`).

Packs are immutable once loaded. `state.packs` is replaced, never edited in place, so a request
that resolved its steering against a pack keeps that pack's tensors (its RowSteering holds them)
until it finishes, whatever is uploaded or deleted meanwhile.

A pack that is corrupt, truncated, pickled, or made for another model is refused with the loader's
message, logged and skipped: the server serves the others and lists it as failed in
`GET /v1/steering/packs`. Names come from file names and must be plain names (no paths).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from server.security.hardening import valid_name
from steering.packs.consistency import check_against_refusal
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


def concept_names(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


def shipped_concept_packs(lm, names: str, extract: bool = True) -> list[SteeringPack]:
    """The shipped concept packs named in `names` (comma-separated), extracted for `lm` on first
    use and cached like the refusal pack; one that cannot be made is logged and skipped.
    `extract=False`: load cached ones only (a missing one is logged and skipped)."""
    from steering.extraction.store import concept_pack_cached, ensure_concept_pack

    packs = []
    for name in concept_names(names):
        if not extract and not concept_pack_cached(lm, name):
            log.error("concept pack %r not served: it could not be extracted (see above)", name)
            continue
        try:
            packs.append(ensure_concept_pack(lm, name))
        except Exception as exc:  # serve the others; the log says why
            log.error("concept pack %r not served: %s: %s", name, type(exc).__name__, exc)
    return packs


def load_pack_bytes(name: str, tensors: bytes, sidecar: bytes, model,
                    reference: SteeringPack | None = None) -> SteeringPack:
    """Validate an uploaded pack exactly as a pack file at start-up, and, given the shipped
    refusal pack `reference`, against it (`steering.packs.consistency`); PackError if refused."""
    with tempfile.TemporaryDirectory(prefix="steer-pack-") as folder:
        stem = Path(folder) / name
        stem.with_name(name + ".safetensors").write_bytes(tensors)
        stem.with_name(name + ".json").write_bytes(sidecar)
        try:
            pack = load_pack(stem, model=model, name=name)
        except PackError as exc:  # name the upload's parts, not the scratch folder
            raise PackError(str(exc).replace(folder + "/", "")) from None
    if reference is not None:
        check_against_refusal(pack, reference)
    return pack


def install_pack(state, pack: SteeringPack) -> SteeringPack | None:
    """Serve `pack` under its name (replacing one of that name); returns the replaced pack."""
    previous = state.packs.get(pack.name)
    state.packs = {**state.packs, pack.name: pack}
    state.failed_packs = {k: v for k, v in state.failed_packs.items() if k != pack.name}
    if state.default_pack is None:
        state.default_pack = pack.name
    return previous


def remove_pack(state, name: str) -> SteeringPack | None:
    """Stop serving `name` (requests already running keep their steering); the default moves to
    'refusal' or the first pack left."""
    removed = state.packs.get(name)
    state.packs = {k: v for k, v in state.packs.items() if k != name}
    if state.default_pack == name:
        state.default_pack = ("refusal" if "refusal" in state.packs
                              else next(iter(state.packs), None))
    return removed
