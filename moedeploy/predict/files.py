"""The predictor file: one safetensors file whose own JSON header carries what the predictor is.

    [8 bytes: header length n] [n bytes JSON: tensor offsets + "__metadata__"] [tensor bytes]
    __metadata__["moedeploy.predictor"] = JSON {
        "format": 1,
        "kind": "sida" | "routenet",
        "model": {"num_layers", "num_experts", "top_k", "hidden_size", "vocab_size", "router_fingerprint", "path"}
                 (a trace predictor: "num_layers", "num_experts", "top_k", "source"),
        "config": the predictor's settings (sida.SidaConfig, routenet.RouteConfig),
        "training": what it was trained on and how it scored }

`read` checks the file before safetensors sees it (length, JSON, offsets against the file's size), so a
truncated or corrupt file ends in a `PredictorError` naming the problem, never a safetensors traceback.
`check_model` refuses a predictor trained for another model, naming the first field that differs.

This module knows no predictor's tensors (sida.py, routenet.py do).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import replaced
from .base import PredictorError

FORMAT = 1
KEY = "moedeploy.predictor"
MAX_HEADER = 100_000_000  # bytes; safetensors' own limit
DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "I64": (torch.int64, 8),
          "I32": (torch.int32, 4), "I16": (torch.int16, 2)}
# The fields a predictor for a model is checked on, in the order they are reported, with how to say them.
MODEL_FIELDS = {"num_layers": "MoE layers", "num_experts": "experts per layer", "top_k": "top-k",
                "hidden_size": "hidden size", "vocab_size": "vocabulary size", "router_fingerprint": "router fingerprint"}


@dataclass(frozen=True)
class PredictorFile:
    path: Path
    kind: str
    model: dict
    config: dict
    training: dict
    tensors: dict[str, Tensor]


def save(path: str | Path, kind: str, model: dict, config: dict, training: dict, tensors: dict[str, Tensor]) -> Path:
    """Write a predictor file whole or not at all (atomic.replaced)."""
    from safetensors.torch import save as serialize

    header = {"format": FORMAT, "kind": kind, "model": model, "config": config, "training": training}
    data = serialize({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={KEY: json.dumps(header)})
    with replaced(path) as f:
        f.write(data)
    return Path(path)


def read(path: str | Path, kind: str | None = None) -> PredictorFile:
    """Read and check a predictor file; `kind` when the caller needs one kind."""
    path = Path(path)
    if not path.is_file():
        raise PredictorError(f"predictor file {path} does not exist; make one with `moedeploy predict train`")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PredictorError(f"predictor file {path} is truncated or not a predictor ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise PredictorError(f"predictor file {path} is truncated or not a safetensors file (header of {n} bytes "
                                 f"in a file of {size})")
        raw = f.read(n)
    try:
        index = json.loads(raw)
        meta = json.loads(index.pop("__metadata__", {}).get(KEY, "null"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as ex:
        raise PredictorError(f"predictor file {path} has a corrupt header ({ex})") from ex
    if not isinstance(meta, dict):
        raise PredictorError(f"{path} is a safetensors file but not a moedeploy predictor (no {KEY!r} metadata)")
    wrong = [part for part in ("model", "config", "training") if not isinstance(meta.get(part, {}), dict)]
    if wrong or not isinstance(index, dict):
        raise PredictorError(f"predictor file {path} has a corrupt header ({', '.join(wrong) or 'the index'} "
                             "is not a JSON object)")
    if meta.get("format") != FORMAT:
        raise PredictorError(f"{path} is predictor format {meta.get('format')}; this moedeploy reads {FORMAT}")
    if kind is not None and meta.get("kind") != kind:
        raise PredictorError(f"{path} is a {meta.get('kind')!r} predictor; this needs a {kind!r} one")
    data = size - 8 - n
    for name, entry in index.items():
        try:
            begin, end = entry["data_offsets"]
            _dtype, width = DTYPES[entry["dtype"]]
            count = 1
            for s in entry["shape"]:
                count *= s
        except (KeyError, TypeError, ValueError) as ex:
            raise PredictorError(f"predictor file {path}: tensor {name!r} has a corrupt entry ({ex})") from ex
        if end > data or end - begin != count * width:
            raise PredictorError(f"predictor file {path} is truncated or corrupt: tensor {name!r} needs bytes "
                                 f"{begin}..{end} of {data}")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    except Exception as ex:  # safetensors raises its own error types; the file is unusable whatever they are
        raise PredictorError(f"predictor file {path} is corrupt ({type(ex).__name__}: {ex})") from ex
    return PredictorFile(path=path, kind=meta.get("kind", ""), model=meta.get("model", {}),
                         config=meta.get("config", {}), training=meta.get("training", {}), tensors=tensors)


def check_model(path, trained: dict, actual: dict, how: str = "moedeploy predict train --model DIR") -> None:
    """Refuse a predictor trained for another model: the first of MODEL_FIELDS that differs, or that the model
    or trace at hand has and the header does not say (a predictor file always names them all).
    trained: the header's model fields; actual: the same fields of the model or trace at hand."""
    for name, words in MODEL_FIELDS.items():
        if name in actual and name not in trained:
            raise PredictorError(f"predictor {path} does not say the {words} of the model it was trained for ({name} "
                                 f"missing from its header): corrupt, or from another version; train one with `{how}`")
        if name in actual and trained[name] != actual[name]:
            raise PredictorError(f"predictor {path} was trained for a model with {words} {trained[name]}; this "
                                 f"model has {actual[name]} ({name} differs): train one for it with `{how}`")


def require(pf: PredictorFile, names: list[str]) -> None:
    """The tensors a predictor kind needs are all there."""
    missing = [n for n in names if n not in pf.tensors]
    if missing:
        raise PredictorError(f"predictor file {pf.path} lacks the tensors {missing}: corrupt, or from another version")


def router_fingerprint(routers) -> str:
    """A hash of every router's weights (and bias), rounded to bfloat16 so the same checkpoint loaded in
    float32 or bfloat16 gives the same fingerprint: 16 hex digits."""
    h = hashlib.sha256()
    for router in routers:
        for t in (router.weight, getattr(router, "bias", None)):
            if t is not None:
                t = t.detach().to("cpu", torch.bfloat16).contiguous()
                h.update(str(tuple(t.shape)).encode())
                h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def model_info(model) -> dict:
    """The header fields of a model loaded with moedeploy.load."""
    layers = list(model.moedeploy.layers.values())
    first = layers[0].router
    return {"num_layers": len(layers), "num_experts": first.num_experts, "top_k": first.top_k,
            "hidden_size": int(first.weight.shape[1]), "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
            "router_fingerprint": router_fingerprint(layer.router for layer in layers)}
