"""``fedvision data partition``: the run's partition, written and shown without running."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.prepare import partition_spec, prepare_data, write_partition


def partition_command(overrides: Sequence[str], out: Path, *, progress: bool = True) -> str:
    """Compose the config, prepare the data, partition it into ``out``; return the report."""
    cfg = compose_config(overrides)
    partition_spec(cfg)  # a bad setting fails before the data is generated or decoded
    prepared = prepare_data(cfg.data, progress=progress)
    write_partition(prepared, cfg, out)
    return (
        f"{(out / C.PARTITION_STATS).read_text().strip()}\n"
        f"wrote {out / C.PARTITION_FILE}, {out / C.PARTITION_STATS}, {out / C.PARTITION_HEATMAP}"
    )
