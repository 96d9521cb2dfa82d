"""`Placement`: which logical expert each physical slot of each device holds, for every MoE layer.

    slots [L, S]  logical expert in physical slot s; device d owns slots d*P .. (d+1)*P - 1, P = S / devices
    share [L, S]  the slot's share of its expert's tokens (an expert's replicas sum to 1)

Every expert has at least one slot per layer, and no expert has two slots on one device. The file is
JSON (`Placement.save` / `read_placement`), checked against the model it is used for (`check_model`).

Legend: L = MoE layers, E = experts per layer, S = physical slots per layer (S >= E), P = slots per device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import replaced
from ..errors import PlacementError

FORMAT = "moedeploy-placement"
VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """What a placement must agree with: MoE layers, experts per layer, experts per token."""

    num_layers: int
    num_experts: int
    top_k: int
    source: str = ""  # where the statistics came from (a trace's source), for messages only

    def differs(self, other: "ModelShape") -> list[str]:
        return [f"{name} {a} vs {b}" for name, a, b in (
            ("MoE layers", self.num_layers, other.num_layers), ("experts", self.num_experts, other.num_experts),
            ("top-k", self.top_k, other.top_k)) if a != b]


@dataclass(frozen=True)
class Placement:
    model: ModelShape
    devices: int
    slots: np.ndarray  # [L, S] int64 physical -> logical
    share: np.ndarray  # [L, S] float64
    algorithm: str = ""
    notes: dict = field(default_factory=dict)  # free-form: what it was planned on

    def __post_init__(self):
        validate(self.slots, self.share, self.devices, self.model.num_experts)
        if self.slots.shape[0] != self.model.num_layers:
            raise PlacementError(f"the placement has {self.slots.shape[0]} layers, its model {self.model.num_layers}")

    @property
    def num_slots(self) -> int:
        return self.slots.shape[1]

    @property
    def slots_per_device(self) -> int:
        return self.num_slots // self.devices

    def device_of_slot(self) -> np.ndarray:
        """[S] the device that owns each slot."""
        return np.arange(self.num_slots) // self.slots_per_device

    def local(self, layer: int, device: int) -> np.ndarray:
        """[P] the logical experts in `device`'s slots of `layer`, slot order."""
        P = self.slots_per_device
        return self.slots[layer, device * P:(device + 1) * P]

    def check_model(self, model: ModelShape, what: str = "this model") -> None:
        diff = self.model.differs(model)
        if diff:
            raise PlacementError(f"the placement was made for another model ({', '.join(diff)}; it came from "
                                 f"{self.model.source or 'an unnamed source'}); plan one for {what} with "
                                 "`moedeploy place --trace <a trace of it>`")

    # --- files ---------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "algorithm": self.algorithm, "devices": self.devices,
                "model": {"num_layers": self.model.num_layers, "num_experts": self.model.num_experts,
                          "top_k": self.model.top_k, "source": self.model.source},
                "slots": self.slots.tolist(), "share": np.round(self.share, 6).tolist(), "notes": self.notes}

    def save(self, path: str | Path) -> Path:
        """Write atomically (atomic.replaced): a reader sees the old file or the whole new one."""
        with replaced(path, "w") as f:
            json.dump(self.to_json(), f)
        return Path(path)


def read_placement(path: str | Path) -> Placement:
    path = Path(path)
    if not path.is_file():
        raise PlacementError(f"placement file {path} does not exist; write one with `moedeploy place ... --out {path}`")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise PlacementError(f"{path} is not a moedeploy placement (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise PlacementError(f"{path} is placement version {d.get('version')!r}; this moedeploy reads {VERSION}")
        m = d["model"]
        model = ModelShape(int(m["num_layers"]), int(m["num_experts"]), int(m["top_k"]), str(m.get("source", "")))
        slots = np.asarray(d["slots"], dtype=np.int64)
        share = np.asarray(d["share"], dtype=np.float64)
        return Placement(model=model, devices=int(d["devices"]), slots=slots, share=share,
                         algorithm=str(d.get("algorithm", "")), notes=dict(d.get("notes", {})))
    except PlacementError as ex:
        if str(path) in str(ex):
            raise
        raise PlacementError(f"{path}: {ex}") from None
    except (OSError, ValueError, KeyError, TypeError) as ex:
        raise PlacementError(f"{path} is not a readable placement file ({ex!r}); write it again with "
                             "`moedeploy place ... --out`") from ex


def validate(slots: np.ndarray, share: np.ndarray, devices: int, num_experts: int) -> None:
    """Every rule a placement obeys, each broken one a PlacementError naming it."""
    if slots.ndim != 2 or share.shape != slots.shape:
        raise PlacementError(f"slots {slots.shape} and share {share.shape} must both be [layers, slots]")
    L, S = slots.shape
    if devices < 1:
        raise PlacementError(f"devices must be at least 1, got {devices}")
    if S < devices:
        raise PlacementError(f"{devices} devices but only {S} slots per layer: every device needs a slot; "
                             "use fewer devices or more slots")
    if S % devices:
        raise PlacementError(f"{S} slots do not split evenly over {devices} devices; use a multiple of {devices}")
    if S < num_experts:
        raise PlacementError(f"{S} slots cannot hold {num_experts} experts; use at least {num_experts} slots")
    if slots.min(initial=0) < 0 or slots.max(initial=0) >= num_experts:
        raise PlacementError(f"slot contents must be expert ids 0..{num_experts - 1}")
    P = S // devices
    for layer in range(L):
        if len(np.unique(slots[layer])) != num_experts:
            missing = sorted(set(range(num_experts)) - set(slots[layer].tolist()))
            raise PlacementError(f"layer {layer}: experts {missing[:8]} have no slot")
        per_device = slots[layer].reshape(devices, P)
        for d in range(devices):
            if len(np.unique(per_device[d])) != P:
                e = int(np.bincount(per_device[d]).argmax())
                raise PlacementError(f"layer {layer}: expert {e} has two replicas on device {d}; replicas of one "
                                     "expert must sit on different devices")
        sums = np.bincount(slots[layer], weights=share[layer], minlength=num_experts)
        if np.any(share[layer] < 0) or not np.allclose(sums, 1.0, atol=1e-4):
            raise PlacementError(f"layer {layer}: each expert's replica shares must be >= 0 and sum to 1")


def contiguous(model: ModelShape, devices: int, slots_per_layer: int | None = None) -> Placement:
    """The baseline: experts 0..E-1 in order over the devices' slots, one replica each (needs S == E)."""
    E = model.num_experts
    S = E if slots_per_layer is None else slots_per_layer
    if S != E:
        raise PlacementError(f"the contiguous placement has one slot per expert ({E}), not {S}")
    slots = np.tile(np.arange(E), (model.num_layers, 1))
    return Placement(model=model, devices=devices, slots=slots, share=np.ones(slots.shape), algorithm="contiguous")
