"""Every limit one notebook runs under, in one type: the rubric's ``[limits]`` table sets any of them,
the executor enforces them, the batch derives its per-submission time limit from them. Defaults live
here and nowhere else."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Resource limits for one notebook. ``memory_bytes`` is *virtual* address space per process
    (RLIMIT_AS): importing torch + torchvision + matplotlib and a small CNN training peaks near
    3.4 GiB virtual (0.95 GiB resident) on this build, so 6 GiB leaves margin. Per process, it does
    not stop a notebook of many processes, nor files in tmpfs: where a resource box can be made
    (:mod:`grader.cgroups`), ``box_memory_bytes`` caps the resident memory of all the kernel's
    processes together, its tmpfs files included (``/tmp``, ``/dev/shm`` and a tmpfs work dir:
    3 x ``tmp_bytes`` at most), and ``processes`` its tasks. ``processes`` is also RLIMIT_NPROC,
    which counts threads too (an idle ipykernel has about 10; with torch about 15)."""

    cell_timeout: float = 120
    notebook_timeout: float = 900
    memory_bytes: int = 6 << 30
    box_memory_bytes: int = 4 << 30
    processes: int = 256
    file_size_bytes: int = 256 << 20
    tmp_bytes: int = 512 << 20
    output_bytes: int = 2_000_000
    threads: int = 1
    cpu_seconds: int | None = None  # default: notebook_timeout + 60


def from_table(table: dict[str, Any]) -> Limits:
    """``Limits`` from a TOML table; raises ValueError naming an unknown key or a value of the wrong
    type (the rubric loader turns it into a one-line error naming the file)."""
    fields = {field.name: field for field in dataclasses.fields(Limits)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ValueError(f"unknown limit {key!r}; known: {', '.join(fields)}")
        wanted = float if key.endswith("timeout") else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                or (wanted is int and not float(value).is_integer()):
            raise ValueError(f"limit {key!r} must be a positive {'number' if wanted is float else 'integer'}")
        values[key] = wanted(value)
    return Limits(**values)
