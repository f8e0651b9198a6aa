"""Builds the native kernels with torch's cpp_extension: once per machine (cached), `None` where it cannot."""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # at::parallel_for is OpenMP, in the header
# Vector sets the kernels are written for, widest first, each with the CPU flags it needs and its compiler
# flags. AVX-512 widens the batched dot products (compute-bound from a few rows up); one row stays AVX2.
ISAS = {"avx512": ({"avx512f", "avx2", "fma"}, ["-mavx512f"]), "avx2": ({"avx2", "fma"}, [])}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def best_isa() -> str | None:
    """The widest vector set in `ISAS` this CPU has, or None."""
    flags = cpu_flags()
    return next((isa for isa, (needs, _) in ISAS.items() if needs <= flags), None)


def versioned_name(name: str, source: Path, isa: str = "avx2") -> str:
    """`name`, the vector set, and a hash of the source and the headers beside it: torch's build cache only
    sees the .cpp, and one cache may serve machines with different CPUs."""
    digest = hashlib.sha256()
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.read_bytes())
    return f"{name}_{isa}_{digest.hexdigest()[:12]}"


def build(name: str, source: Path, isa: str | None = None) -> ModuleType | None:
    """The compiled extension `name` from `source` for `isa` (default: the widest this CPU has), or None
    (not x86 with AVX2/FMA, no compiler)."""
    isa = isa or best_isa()
    if platform.machine() not in ("x86_64", "AMD64") or isa is None or not ISAS[isa][0] <= cpu_flags():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(versioned_name(name, source, isa), [str(source)], extra_cflags=FLAGS + ISAS[isa][1],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no headers: the stock path serves instead
        log.warning("native kernel %s unavailable, using torch: %s", name, str(error).splitlines()[0])
        return None
