"""int8 post-training static quantization with PyTorch's FX graph mode (x86 / fbgemm kernels).

torch 2.14 still ships ``torch.ao.quantization.quantize_fx`` and it works, but it warns that it
is deprecated in favour of torchao's PT2E flow (``prepare_pt2e``/``convert_pt2e``). That flow needs
the torchao package and gets its int8 speed only through ``torch.compile`` (in eager mode it runs
quantize/dequantize around float kernels), whereas ``convert_fx`` gives a module that runs real
int8 kernels in eager mode. So fedvision uses FX until torch drops it; the warnings are silenced
here, at the one place that calls it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedvision.errors import FedvisionError
from fedvision.models import build_model

BACKEND = "x86"  # fbgemm with the onednn fallback; what torch picks on x86 CPUs


def _fx() -> tuple[Any, Any, Any]:
    # Imported on use: importing torch.ao.quantization already emits the deprecation warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    return get_default_qconfig_mapping, prepare_fx, convert_fx


def quantize_int8(model: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    """Return an int8 copy of ``model`` calibrated on ``calibration`` batches (CPU only).

    Parameters
    ----------
    model
        A float classifier; it is put in eval mode and is not changed otherwise.
    calibration
        Normalised float image batches ``[B, 3, H, W]`` whose activation ranges set the scales.

    Returns
    -------
    nn.Module
        A ``torch.fx.GraphModule`` running quantized conv/linear kernels; its state dict holds
        quantized tensors and reloads with :func:`load_int8`.
    """
    get_mapping, prepare_fx, convert_fx = _fx()
    batches = list(calibration)
    if not batches:
        raise FedvisionError("int8 calibration needs at least one batch of training images")
    torch.backends.quantized.engine = BACKEND
    float_model = model.cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prepared = prepare_fx(
                float_model, get_mapping(BACKEND), example_inputs=(batches[0][:1],)
            )
        except Exception as exc:  # torch.fx raises TraceError and others for dynamic control flow
            raise FedvisionError(
                f"cannot trace {type(model).__name__} for FX quantization ({type(exc).__name__}: "
                f"{exc})".splitlines()[0]
                + "; int8 needs a symbolically traceable model, leave out --quantize"
            ) from exc
        with torch.inference_mode():
            for x in batches:
                prepared(x)
        quantized = convert_fx(prepared)
        try:
            # Some quantized kernels reject shapes their float versions take (shufflenet's and
            # mnasnet's final mean over a 1x1 map): fail here, in one line, not mid-evaluation.
            with torch.inference_mode():
                quantized(batches[0][:2])
        except RuntimeError as exc:
            raise FedvisionError(
                f"the int8 {type(model).__name__} fails on {tuple(batches[0].shape[1:])} inputs "
                f"({exc})".splitlines()[0]
                + "; quantized kernels lack this case, leave out --quantize or use larger images"
            ) from exc
        return quantized


def load_int8(path: Path, arch: str, num_classes: int, image_size: int) -> nn.Module:
    """Rebuild an int8 model saved by ``fedvision compress`` (``{"int8_model": state_dict}``).

    The graph is rebuilt by quantizing a fresh ``arch`` (calibrated on one dummy batch) and then
    the saved scales, zero points and int8 weights replace everything it computed.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about its own quantized storages
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FedvisionError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict) or "int8_model" not in raw:
        raise FedvisionError(f"{path} is not an int8 model written by fedvision compress")
    shell = quantize_int8(
        build_model(arch, num_classes), [torch.zeros(1, 3, image_size, image_size)]
    )
    shell.load_state_dict(raw["int8_model"])
    return shell
