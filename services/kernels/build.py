"""Builds the native kernels with torch's cpp_extension: once per machine (cached), `None` where it cannot."""

from __future__ import annotations

import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # at::parallel_for is OpenMP, in the header


def cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def versioned_name(name: str, source: Path) -> str:
    """`name` plus a hash of the source and the headers beside it: torch's build cache only sees the .cpp."""
    digest = hashlib.sha256()
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.read_bytes())
    return f"{name}_{digest.hexdigest()[:12]}"


def build(name: str, source: Path) -> ModuleType | None:
    """The compiled extension `name` from `source`, or None (not x86 with AVX2/FMA, no compiler)."""
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_has_avx2_fma():
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(versioned_name(name, source), [str(source)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                    verbose=False)
    except Exception as error:  # no compiler, no headers: the stock path serves instead
        log.warning("native kernel %s unavailable, using torch: %s", name, str(error).splitlines()[0])
        return None
