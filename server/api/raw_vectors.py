"""A steering object with its own vector (`"vector": {"data", "shape"?, "layer"?}`): decoded,
checked and turned into a vector pack by the library (`steering.interventions.raw`), under the
server's norm bound (`STEER_MAX_VECTOR_NORM`). `check_raw` is the validation step's check of such
an object, after its strength range (`server.api.validation`): what it returns builds its row like any
pack's (`Checked.build`), and the row joins the batch like a pack's. Its echo carries
`vector: {sha256, norm, shape, layer}` (never the data), which the policy reads (the
`raw_vectors` grant, `server.security.policy`) and the audit line records. What is done here
before the policy is bounded by the size check (at most `MAX_BASIS` × d values); the row's edits
are built, like every object's, by `Checked.build` after admission.
"""

from __future__ import annotations

from server.api.resolve import Part
from server.errors import ErrorCode, not_found
from server.state import ServerState
from steering.interventions.methods import check_spec
from steering.interventions.raw import raw_spec
from steering.interventions.schema import SteeringObject


def check_raw(state: ServerState, params: SteeringObject, where: str, max_norm: float) -> Part:
    """A steering object that carries a vector, checked (`where`: `steering` or `steering[i]`;
    its strength already checked by the validation step): its size against the model's hidden
    size before anything is decoded, then its values, bounded by `max_norm`, then the spec
    against its vector pack (`check_spec`, as every object is). Raises `SteeringError` naming
    the field (`steering.vector.data`, ...), which the validation step turns into a 400."""
    vector = params.vector
    assert vector is not None
    when_pack = None
    if params.when is not None and params.when.pack is not None:
        when_pack = state.packs.get(params.when.pack)
        if when_pack is None:
            known = ", ".join(sorted(state.packs)) or "none loaded"
            raise not_found(f"unknown steering pack {params.when.pack!r}; loaded packs: "
                            f"{known}", f"{where}.when.pack", ErrorCode.PACK_NOT_FOUND)
    lm = state.lm
    spec, pack = raw_spec(params.to_spec(params.pack), vector.data, vector.shape, vector.layer,
                          lm.n_layers, lm.d_model, max_norm=max_norm, param=f"{where}.vector")
    return Part(check_spec(spec, pack, when_pack), pack, when_pack)
