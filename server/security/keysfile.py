"""The keys file (`STEER_KEYS_FILE`, or the same document inline in `STEER_KEYS`) as pydantic
models: one schema validates every field, so a typo (`lower_refusals: true`), a string where a
boolean belongs (`admin: "yes"`) or a bound that is not a finite number is refused at start with
the field's path, instead of being read by hand and half ignored.

    default:                 # PolicyFields: every key's policy unless the key overrides a field
      methods: [none, actadd, ace]
    keys:                    # KeyEntry: PolicyFields + id, sha256, admin, pack_admin
      - id: alice
        sha256: <64 hex digits>
        lower_refusal: true
        pack_admin: true     # may upload / delete packs; needs lower_refusal: true
        raw_vectors: true    # may send its own steering vectors; needs lower_refusal: true

`build(data, source)` turns a parsed document into (id, sha256, Policy, admin, pack_admin)
records; `server.security.auth` makes its key store from them. A document that is empty (an
empty file, `null`) has no keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from server.security.policy import Policy, PolicyError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")

Number = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
Signed = Annotated[float, Field(allow_inf_nan=False, strict=True)]
Names = list[Annotated[str, Field(strict=True)]] | Literal["*"] | None


class Bounds(BaseModel):
    """Signed bounds on one method's strength (either may be left out)."""

    model_config = ConfigDict(extra="forbid")
    min: Signed | None = None
    max: Signed | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min exceeds max")
        return self


class PolicyFields(BaseModel):
    """A policy as written: only the fields given change the base policy (`apply`)."""

    model_config = ConfigDict(extra="forbid")
    methods: Names = Field(None, description="allowed methods, or '*' for every method")
    packs: Names = Field(None, description="allowed packs, or '*' for every loaded pack")
    presets: Names = Field(None, description="allowed presets, or '*' for every preset")
    max_strength: Number | None = None
    max_k: Annotated[int, Field(ge=0, strict=True)] | None = None
    requests_per_minute: Number | None = None
    tokens_per_minute: Number | None = None
    max_concurrent: Annotated[int, Field(ge=1, strict=True)] | None = Field(
        None, description="requests of the key in flight at once (None: no bound)")
    lower_refusal: StrictBool = False
    raw_vectors: StrictBool = Field(False, description="may send a steering object's own vector "
                                                       "(docs/stream.md; needs lower_refusal)")
    strength: dict[str, Bounds] | None = None

    def apply(self, base: Policy) -> Policy:
        """`base` with the fields this document sets."""
        updates: dict = {}
        for name in self.model_fields_set & set(PolicyFields.model_fields):
            value = getattr(self, name)
            if name in ("methods", "packs", "presets"):
                value = None if value in (None, "*") else frozenset(value)
            elif name == "strength":
                value = tuple((m, b.min, b.max) for m, b in sorted((value or {}).items()))
            updates[name] = value
        return replace(base, **updates)


class KeyEntry(PolicyFields):
    id: str = Field(pattern=ID_PATTERN, description="1–64 letters, digits, '.', '_', '@', '-'")
    sha256: str = Field(description="the 64 hex digits of the key's SHA-256 (never the key)")
    admin: StrictBool = Field(False, description="may see internals: pack metadata, why a "
                                                 "pack was refused")
    pack_admin: StrictBool = Field(False, description="may upload and delete packs (needs "
                                                      "lower_refusal: true)")

    @model_validator(mode="after")
    def _hash(self) -> KeyEntry:
        if not HEX64.match(self.sha256):
            raise ValueError("sha256 must be the 64 hex digits of the key's SHA-256 (keys are "
                             "never stored in clear)")
        self.sha256 = self.sha256.lower()
        return self


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: PolicyFields | None = None
    keys: list[KeyEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    sha256: str
    policy: Policy
    admin: bool
    pack_admin: bool


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def build(data: object, source: str = "keys") -> list[KeyRecord]:
    """Validate a parsed keys document; PolicyError naming the field on any problem."""
    if data is None:
        return []
    try:
        doc = KeysFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _where(first["loc"])
        raise PolicyError(f"{source}: {where + ': ' if where else ''}{first['msg']}"
                          f"{f' ({exc.error_count()} problems)' if exc.error_count() > 1 else ''}"
                          ) from None
    default = doc.default.apply(Policy()) if doc.default is not None else Policy()
    records, ids, hashes = [], set(), set()
    for i, entry in enumerate(doc.keys):
        where = f"{source}: keys[{i}]"
        if entry.id in ids or entry.sha256 in hashes:
            raise PolicyError(f"{where}: duplicate id or key")
        ids.add(entry.id)
        hashes.add(entry.sha256)
        policy = entry.apply(default)
        if entry.pack_admin and not policy.lower_refusal:
            raise PolicyError(f"{where}.pack_admin: uploading packs can change what every "
                              "method does, so it needs the refusal-lowering grant too "
                              "(lower_refusal: true)")
        if policy.raw_vectors and not policy.lower_refusal:
            raise PolicyError(f"{where}.raw_vectors: a vector of the caller's own can lower "
                              "refusal at any strength, so the grant needs the refusal-lowering "
                              "grant too (lower_refusal: true)")
        records.append(KeyRecord(entry.id, entry.sha256, policy, entry.admin, entry.pack_admin))
    return records
