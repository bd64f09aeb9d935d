"""``fedvision data partition``: the run's partition, written and shown without running."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedvision import constants as C
from fedvision.config import compose_config
from fedvision.runner import prepare_data, write_partition


def partition_command(overrides: Sequence[str], out: Path, *, progress: bool = True) -> str:
    """Compose the config, prepare the data, partition it into ``out``; return the report."""
    cfg = compose_config(overrides)
    prepared = prepare_data(cfg.data, progress=progress)
    partition, table = write_partition(prepared, cfg.partition, out)
    return (
        f"{table}\n\npartition fingerprint: {partition.fingerprint}\n"
        f"wrote {out / C.PARTITION_FILE}, {out / C.PARTITION_STATS}, {out / C.PARTITION_HEATMAP}"
    )
