"""Where a model's default packs live, and getting one (extracting it on first use): the refusal
pack, and the shipped concept packs (`steering.data.contrastive.SHIPPED_CONCEPTS`)."""

from __future__ import annotations

import logging
from pathlib import Path

from steering.models.embedded import cache_root
from steering.models.fingerprint import fingerprint
from steering.models.loading import LoadedModel
from steering.packs.format import PackError, SteeringPack, load_pack, pack_paths
from steering.packs.identity import hook_layout

log = logging.getLogger(__name__)


def default_pack_path(lm: LoadedModel, name: str = "refusal") -> Path:
    """<cache>/packs/<model>-<arch>/extract-v<N>/<name>: a new extraction version gets a new
    folder, so a server never keeps serving a pack chosen by an older extraction."""
    from steering.extraction.extract import EXTRACT_VERSION

    fp = fingerprint(lm.model)
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in lm.name)
    return cache_root() / "packs" / f"{safe}-{fp['arch']}" / f"extract-v{EXTRACT_VERSION}" / name


def _cached(target: Path, lm: LoadedModel, name: str, given: bool = False) -> SteeringPack | None:
    """The cached pack at `target`, or None when it was made for other weights of this model
    (its checkpoint files were updated in place: extract again). A pack the caller named is
    never replaced: its PackError goes up."""
    try:
        return load_pack(target, model=lm.model, name=name)
    except PackError as exc:
        if given or "other weights" not in str(exc):
            raise
        log.info("cached pack %s: %s; extracting again", target, exc)
        return None


def pack_cached(lm: LoadedModel, path: str | Path | None = None, name: str = "refusal") -> bool:
    """Whether `ensure_pack(lm, path, name=name)` would only load (extract nothing)."""
    from steering.extraction.extract import EXTRACT_VERSION

    target = Path(path) if path else default_pack_path(lm, name)
    if not pack_paths(target)[0].is_file():
        return False
    if path:
        return True  # a pack the caller named is used as it is (or refused: not ours to redo)
    try:
        pack = _cached(target, lm, name)
    except PackError:  # ensure_pack will say why
        return True
    return pack is not None and pack.meta.get("extract_version", 1) == EXTRACT_VERSION


def concept_pack_cached(lm: LoadedModel, name: str) -> bool:
    """Whether `ensure_concept_pack(lm, name)` would only load (extract nothing)."""
    from steering.extraction.concept import CONCEPT_VERSION

    target = default_pack_path(lm, name)
    if not pack_paths(target)[0].is_file():
        return False
    try:
        pack = _cached(target, lm, name)
    except PackError:  # ensure_concept_pack will say why
        return True
    return pack is not None and pack.meta.get("concept_version") == CONCEPT_VERSION


def ensure_pack(lm: LoadedModel, path: str | Path | None = None, mode: str = "fast",
                name: str = "refusal") -> SteeringPack:
    """Load the pack at `path` (default: the model's cached pack); extract it if missing, or if
    the cached default pack comes from an older extraction version."""
    from steering.extraction.extract import EXTRACT_VERSION, ExtractConfig, extract_pack

    target = Path(path) if path else default_pack_path(lm, name)
    tensors, _ = pack_paths(target)
    pack = _cached(target, lm, name, given=bool(path)) if tensors.is_file() else None
    if pack is not None:
        version = pack.meta.get("extract_version", 1)
        if version == EXTRACT_VERSION:
            return pack
        if path:
            log.warning("pack %s comes from extraction version %s (current: %s); using it as "
                        "given", tensors, version, EXTRACT_VERSION)
            return pack
        log.info("cached pack %s is from extraction version %s: extracting again", tensors,
                 version)
    elif not tensors.is_file():
        log.info("no steering pack at %s: extracting one (%s mode)", tensors, mode)
    pack = extract_pack(lm, config=ExtractConfig.preset(mode), name=name)
    pack.meta.setdefault("hook", hook_layout(lm.model))
    pack.save(target)
    return pack


def ensure_concept_pack(lm: LoadedModel, name: str) -> SteeringPack:
    """The cached pack of shipped concept `name`, extracted on first use (or when the cached one
    comes from another concept-extraction version)."""
    from steering.data.contrastive import SHIPPED_CONCEPTS, load_examples
    from steering.extraction.concept import CONCEPT_VERSION, extract_concept

    try:
        shipped = SHIPPED_CONCEPTS[name]
    except KeyError:
        raise ValueError(f"no shipped concept {name!r} (known: "
                         f"{', '.join(sorted(SHIPPED_CONCEPTS))})") from None
    target = default_pack_path(lm, name)
    pack = _cached(target, lm, name) if pack_paths(target)[0].is_file() else None
    if pack is not None:
        if pack.meta.get("concept_version") == CONCEPT_VERSION:
            return pack
        log.info("cached concept pack %s is from another extraction version: extracting again",
                 target)
    elif not pack_paths(target)[0].is_file():
        log.info("no %r concept pack at %s: extracting one", name, target)
    pack = extract_concept(lm, load_examples(shipped.positive), load_examples(shipped.negative),
                           name, sources=(shipped.positive, shipped.negative),
                           behaviour=shipped.behaviour)
    pack.save(target)
    return pack
