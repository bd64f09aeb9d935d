"""Model compression after federated training: pruning, int8 quantization, their measurement."""

from fedvision.compress.measure import count_parameters, latency_ms_per_image, zlib_size
from fedvision.compress.pipeline import (
    CompressSpec,
    compress_run,
    format_markdown,
    resolve_source,
    write_tables,
)
from fedvision.compress.prune import (
    check_sparsity,
    make_permanent,
    prunable_layers,
    prune_channels,
    prune_global_unstructured,
)
from fedvision.compress.quantize import load_int8, quantize_int8

__all__ = [
    "CompressSpec",
    "check_sparsity",
    "compress_run",
    "count_parameters",
    "format_markdown",
    "latency_ms_per_image",
    "load_int8",
    "make_permanent",
    "prunable_layers",
    "prune_channels",
    "prune_global_unstructured",
    "quantize_int8",
    "resolve_source",
    "write_tables",
    "zlib_size",
]
