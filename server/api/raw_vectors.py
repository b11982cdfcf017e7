"""A steering object with its own vector (`"vector": {"data", "shape"?, "layer"?}`): decoded,
checked and turned into its row by the library (`steering.interventions.raw`), under the server's
norm bound (`STEER_MAX_VECTOR_NORM`) and strength range. The row joins the batch like a pack's;
its echo carries `vector: {sha256, norm, shape, layer}` (never the data), which the policy reads
(the `raw_vectors` grant, `server.security.policy`) and the audit line records.
"""

from __future__ import annotations

from server.errors import bad_request, not_found
from server.state import ServerState
from steering.interventions.methods import RowSteering, SteeringError, build_row
from steering.interventions.raw import raw_spec
from steering.interventions.schema import SteeringObject


def _at(param: str | None, where: str) -> str:
    """`steering.x` → `steering[1].x` for object 1 of a list (`where` is its name)."""
    param = param or where
    if param == "steering" or param.startswith("steering."):
        return where + param[len("steering"):]
    return param


def resolve_raw(state: ServerState, params: SteeringObject, where: str) -> RowSteering:
    """The row of a steering object that carries a vector (`where`: `steering` or
    `steering[i]`)."""
    settings = state.settings
    lo, hi = settings.strength_min, settings.strength_max
    if not lo <= params.strength <= hi:
        raise bad_request(f"{where}.strength must be between {lo:g} and {hi:g}, got "
                          f"{params.strength:g}", f"{where}.strength", "strength_out_of_range")
    vector = params.vector
    assert vector is not None
    when_pack = None
    if params.when is not None and params.when.pack is not None:
        when_pack = state.packs.get(params.when.pack)
        if when_pack is None:
            known = ", ".join(sorted(state.packs)) or "none loaded"
            raise not_found(f"unknown steering pack {params.when.pack!r}; loaded packs: "
                            f"{known}", f"{where}.when.pack", "pack_not_found")
    lm = state.lm
    try:
        spec, pack = raw_spec(params.to_spec(params.pack), vector.data, vector.shape,
                              vector.layer, lm.n_layers, lm.d_model,
                              max_norm=settings.max_vector_norm, param=f"{where}.vector")
        return build_row(spec, pack, when_pack)
    except SteeringError as exc:
        raise bad_request(str(exc), _at(exc.param, where), "invalid_vector"
                          if (exc.param or "").startswith(f"{where}.vector")
                          else "invalid_steering") from None
