"""What a compressed variant costs: parameters and non-zeros, bytes on disk, CPU latency."""

from __future__ import annotations

import statistics
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (parameters, non-zero parameters) of a float or an FX-quantized model.

    Quantized conv/linear modules hold their weights packed, outside ``parameters()``; they are
    read through their ``weight()``/``bias()`` methods and counted after dequantizing, so an
    int8 weight that rounds to zero counts as zero.
    """
    total = nonzero = 0
    for module in model.modules():
        tensors = [p.detach() for p in module.parameters(recurse=False)]
        if callable(getattr(module, "weight", None)):
            tensors.append(module.weight())
            bias = module.bias() if callable(getattr(module, "bias", None)) else None
            if bias is not None:
                tensors.append(bias)
        for t in tensors:
            t = t.dequantize() if t.is_quantized else t
            total += t.numel()
            nonzero += int(torch.count_nonzero(t))
    return total, nonzero


def zlib_size(path: Path) -> int:
    """Bytes of ``path`` after zlib (level 6): what unstructured zeros save once zipped."""
    return len(zlib.compress(path.read_bytes(), 6))


def latency_ms_per_image(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    *,
    repeats: int = 10,
    warmup: int = 2,
    threads: int = 1,
    progress: bool = False,
) -> dict[str, float]:
    """Median CPU milliseconds per image of each model on the batch ``x``.

    The models take turns within each repeat, so a slowdown of a shared machine hits all of them
    alike and their ratios stay fair. ``torch.set_num_threads(threads)`` holds for the
    measurement and the previous setting is restored afterwards.

    Parameters
    ----------
    models
        Name -> model, all run on the CPU in eval mode.
    x
        The input batch (its size is the batch size measured).
    repeats, warmup
        Timed and untimed forward passes per model.
    threads
        torch intra-op threads while timing.
    progress
        Show a tqdm bar over repeats on stderr.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                m.cpu().eval()
                for _ in range(warmup):
                    m(x)
            desc = f"latency b{len(x)}"
            for _ in tqdm(range(repeats), desc=desc, disable=not progress, leave=False):
                for name, m in models.items():
                    start = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: 1000.0 * statistics.median(t) / len(x) for name, t in times.items()}
