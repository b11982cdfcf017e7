"""A pack checked against the model's shipped refusal pack, before it may be served next to it.

A pack's vectors decide what a method does: ActAdd adds `strength · r_l` (Turner et al. 2023),
ACE moves the refusal coordinate to `μ⁻_l + α·‖r_l‖·r̂_l` (Marshall et al. 2024, eq. 3), with
r_l = μ⁺_l − μ⁻_l the difference in means at layer l (Arditi et al. 2024, eq. 1). The policy
grants strengths by their effect on refusal (`server.security.policy`): a positive ActAdd, an
ACE at α ≥ 1 raise refusal — *with the shipped direction*. A pack whose class means are swapped
turns those into the grant-only ones (an ordinary key's `actadd +4` becomes `actadd −4`), a pack
whose harmless mean is moved along r̂ does the same to ACE, and a pack whose r is longer is a
larger strength than the key may use. So a pack uploaded while serving is compared with the
refusal pack the server started with, at every layer and read position the two share:

| pack | check (per layer l, position p) |
|---|---|
| refusal concept | where the shipped ‖r_l‖ is at least `SIGNIFICANT` of its largest: cos(r_l, r_l^shipped) > 0 (DiM sign) and the harmless mean's coordinate on r̂^shipped within `MAX_REFERENCE_SHIFT` of the class gap; everywhere: ‖r_l‖ ≤ `MAX_NORM_RATIO` × the shipped length (floored at `SIGNIFICANT` of the largest); each INLP layer's leading direction has a positive cosine with r^shipped there (INLP directions point toward the harmful class) |
| any other concept | its r_l has no component against the shipped refusal direction larger than `MAX_AGAINST` of the shipped length (floored likewise): an inverted refusal direction under another name is refused |

Float32 tensors and orthonormal INLP rows are checked for every pack at load
(`steering.packs.format.load_pack`).
"""

from __future__ import annotations

import torch

from steering.packs.format import PackError, SteeringPack

SIGNIFICANT = 0.1  # layers whose shipped ‖r‖ is at least this fraction of the largest
MAX_NORM_RATIO = 2.0  # an uploaded refusal r may be at most this much longer than the shipped one
MAX_REFERENCE_SHIFT = 0.5  # harmless mean's move along r̂, in units of the shipped ‖r‖
MAX_AGAINST = 0.25  # another concept's component against refusal, in units of the shipped ‖r‖


def _position_pairs(pack: SteeringPack, reference: SteeringPack) -> list[tuple[int, int, int]]:
    """(offset, index in pack, index in reference) for the read positions both hold; the two
    selected positions when they share none."""
    common = [p for p in pack.positions if p in reference.positions]
    if common:
        return [(p, pack.positions.index(p), reference.positions.index(p)) for p in common]
    return [(pack.position, pack.positions.index(pack.position),
             reference.positions.index(reference.position))]


def _dims(pack: SteeringPack, index: int) -> torch.Tensor:
    return (pack.mean_harmful[:, index] - pack.mean_harmless[:, index]).double()


def _layers_against(pack: SteeringPack, reference: SteeringPack):
    """(offset, pack index, shipped index, layer, r, shipped r, ‖shipped r‖, floor) at every
    layer of every shared read position; the floor is SIGNIFICANT × the shipped ‖r‖'s max."""
    for offset, i, j in _position_pairs(pack, reference):
        r, ref = _dims(pack, i), _dims(reference, j)
        ref_norm = ref.norm(dim=-1)
        floor = SIGNIFICANT * float(ref_norm.max())
        for layer in range(pack.n_layers):
            yield offset, i, j, layer, r[layer], ref[layer], float(ref_norm[layer]), floor


def check_against_refusal(pack: SteeringPack, reference: SteeringPack) -> None:
    """PackError unless `pack` may be served next to the shipped refusal pack `reference`."""
    if pack.n_layers != reference.n_layers or pack.d_model != reference.d_model:
        raise PackError(f"pack {pack.name!r} has {pack.n_layers} layers × {pack.d_model}, the "
                        f"shipped refusal pack {reference.n_layers} × {reference.d_model}")
    if pack.concept == "refusal":
        _check_refusal(pack, reference)
    else:
        _check_not_against(pack, reference)


def _check_refusal(pack: SteeringPack, reference: SteeringPack) -> None:
    for offset, i, j, layer, r, ref, ref_norm, floor in _layers_against(pack, reference):
        where = f"pack {pack.name!r} at layer {layer}, position {offset}"
        length = float(r.norm())
        allowed = MAX_NORM_RATIO * max(ref_norm, floor)
        if length > allowed:
            raise PackError(f"{where}: its refusal direction is {length:.3g} long, more "
                            f"than {MAX_NORM_RATIO:g}× the shipped one's ({allowed:.3g}); a "
                            "strength must mean about the same with every refusal pack")
        if ref_norm < floor:
            continue
        unit = ref / ref_norm
        cos = float(r @ unit) / max(length, 1e-12)
        if cos <= 0:
            raise PackError(f"{where}: its difference in means points away from the shipped "
                            f"refusal direction (cosine {cos:.2f}); a refusal pack's means "
                            "are (harmful, harmless), in that order")
        shift = float((pack.mean_harmless[layer, i].double()
                       - reference.mean_harmless[layer, j].double()) @ unit) / ref_norm
        if abs(shift) > MAX_REFERENCE_SHIFT:
            raise PackError(f"{where}: its harmless mean sits {shift:+.2f} class gaps from "
                            "the shipped one along the refusal direction (at most "
                            f"{MAX_REFERENCE_SHIFT:g}); ACE's reference would move")
    ref_at = _dims(reference, reference.positions.index(reference.position))
    floor = SIGNIFICANT * float(ref_at.norm(dim=-1).max())
    for layer, inlp in pack.inlp.items():
        if inlp.count == 0 or float(ref_at[layer].norm()) < floor:
            continue
        lead = inlp.directions[0].double()
        cos = float(lead @ ref_at[layer]) / float(lead.norm() * ref_at[layer].norm())
        if cos <= 0:
            raise PackError(f"pack {pack.name!r}: the leading INLP direction at layer {layer} "
                            f"points away from the shipped refusal direction (cosine {cos:.2f})"
                            "; INLP directions point toward the harmful class")


def _check_not_against(pack: SteeringPack, reference: SteeringPack) -> None:
    for offset, _, _, layer, r, ref, ref_norm, floor in _layers_against(pack, reference):
        if ref_norm == 0.0:
            continue
        along = float(r @ (ref / ref_norm)) / max(ref_norm, floor)
        if along < -MAX_AGAINST:
            raise PackError(f"pack {pack.name!r} (concept {pack.concept!r}) at layer {layer},"
                            f" position {offset}: its direction runs against the shipped "
                            f"refusal direction ({along:+.2f} of its length; at most "
                            f"-{MAX_AGAINST:g}), so adding it would lower refusal")
