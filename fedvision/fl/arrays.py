"""Model weights as they travel in Flower messages: packed float32 ArrayRecords.

Flower's strategies do float arithmetic on every array they aggregate, and FedAdam/FedYogi/
FedAdagrad return float64 arrays, which would double every later download. Sending and keeping
every array as float32 avoids that. The server's global model keeps BatchNorm's integer counters
as float32 too (they never travel); ``load_state_dict`` casts them back to int.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedvision import constants as C
from fedvision.errors import FedvisionError


def float32_arrays(weights: Mapping[str, torch.Tensor] | ArrayRecord) -> ArrayRecord:
    """An ArrayRecord of ``weights`` (a torch state dict or an ArrayRecord), all in float32.

    An ArrayRecord already all float32 comes back as it is: each Array read and made again is a
    copy (60 ms a round for resnet18's aggregate on 2 cores).
    """
    if isinstance(weights, ArrayRecord):
        if all(a.dtype == "float32" for a in weights.values()):
            return weights
        items = ((k, a.numpy()) for k, a in weights.items())
    else:
        items = ((k, t.detach().cpu().numpy()) for k, t in weights.items())
    # astype keeps 0-d arrays 0-d (ascontiguousarray would make BatchNorm's counter 1-d, and a
    # checkpoint then no longer fits the model it came from).
    return ArrayRecord({k: Array(np.asarray(v).astype(np.float32, copy=False)) for k, v in items})


def pack(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` as one flat float32 array under ``C.KEY_FLAT``, in ``arrays``' key order.

    Flower's deployment runtime moves every array of a message as a separate object, each a
    request through the SuperNode, the SuperLink and the ServerApp: a ShuffleNet (338 arrays)
    costs seconds per message on a small machine, a flat vector one request per 5 MB chunk.
    Aggregation is elementwise (a weighted mean, a median, a norm over the whole model), so
    every strategy computes the same numbers on the flat vector as on the arrays.
    """
    parts = [np.asarray(a.numpy(), dtype=np.float32).reshape(-1) for a in arrays.values()]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return ArrayRecord({C.KEY_FLAT: Array(flat)})


def pack_tensors(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``pack(float32_arrays(state))`` with one copy and one Flower Array.

    A Flower ``Array`` holds its data serialised (``np.save``), so every ``Array`` made and
    every ``.numpy()`` read copies the whole model once more: 40 ms for resnet18's 45 MB here.
    A client's reply goes from its state dict to the flat vector directly.
    """
    tensors = [t.detach().reshape(-1).to(torch.float32).cpu() for t in state.values()]
    flat = torch.cat(tensors).numpy() if tensors else np.zeros(0, dtype=np.float32)
    return ArrayRecord({C.KEY_FLAT: Array(flat)})


def _flat(
    packed: ArrayRecord, layout: Mapping[str, tuple[int, ...]]
) -> tuple[np.ndarray, list[int]]:
    """The packed values and the size of each of ``layout``'s arrays, checked against each other."""
    if list(packed.keys()) != [C.KEY_FLAT]:
        raise FedvisionError(
            f"expected one packed array {C.KEY_FLAT!r}, got {len(packed)} arrays: the sender "
            "speaks another message format (a fedvision of another version?)"
        )
    flat = np.asarray(packed[C.KEY_FLAT].numpy(), dtype=np.float32).reshape(-1)
    sizes = [int(np.prod(shape)) for shape in layout.values()]
    if flat.size != sum(sizes):
        raise FedvisionError(
            f"the packed model has {flat.size} values, this model's {len(sizes)} arrays hold "
            f"{sum(sizes)}: client and server run different models"
        )
    return flat, sizes


def unpack(packed: ArrayRecord, layout: Mapping[str, tuple[int, ...]]) -> ArrayRecord:
    """The arrays of ``layout`` (key -> shape, in packing order) cut out of a packed record."""
    flat, sizes = _flat(packed, layout)
    out, start = {}, 0
    for (key, shape), size in zip(layout.items(), sizes, strict=True):
        out[key] = Array(flat[start : start + size].reshape(shape))
        start += size
    return ArrayRecord(out)


def unpack_tensors(
    packed: ArrayRecord, layout: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """``unpack(packed, layout).to_torch_state_dict()`` as views of one tensor (one copy)."""
    flat, sizes = _flat(packed, layout)
    whole = torch.from_numpy(flat if flat.flags.writeable else flat.copy())
    out, start = {}, 0
    for (key, shape), size in zip(layout.items(), sizes, strict=True):
        out[key] = whole[start : start + size].view(shape)
        start += size
    return out


def message_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays ``messages`` carry (what a round sends or receives)."""
    return sum(a.count_bytes() for m in messages for a in m.content.array_records.values())


def layout_of(arrays: ArrayRecord | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a record or a state dict, in its order (what ``unpack`` needs)."""
    if isinstance(arrays, ArrayRecord):
        return {k: tuple(a.shape) for k, a in arrays.items()}
    return {k: tuple(t.shape) for k, t in arrays.items()}
