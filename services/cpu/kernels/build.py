"""Builds the native kernels with torch's cpp_extension: once per machine (cached), `None` where it cannot.
`python -m services.cpu.kernels.build DIR [ISA ...]` builds every kernel for every vector set (or those named)
ahead of time, as the image does."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
X86 = ("x86_64", "AMD64")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # at::parallel_for is OpenMP, in the header
# Vector sets the kernels are written for, widest first, each with the CPU flags it needs and its compiler
# flags. AVX-512 widens the batched dot products (compute-bound from a few rows up); one row stays AVX2;
# VNNI multiplies 4-bit weights by 8-bit inputs in one instruction. F16C reads the 4-bit blocks' fp16 scales.
ISAS = {
    "avx512_vnni": (
        {"avx512f", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"},
        ["-mavx512f", "-mavx512vl", "-mavx512vnni"],
    ),
    "avx512": ({"avx512f", "avx2", "fma", "f16c"}, ["-mavx512f"]),
    "avx2": ({"avx2", "fma", "f16c"}, []),
}


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
    """`name`, the vector set, and a hash of the flags, the source and the headers beside it: torch's build
    cache only sees the .cpp, and one cache may serve machines with different CPUs."""
    digest = hashlib.sha256(" ".join(FLAGS + ISAS[isa][1]).encode())  # a prebuilt file must match the flags too
    for path in [source, *sorted(source.parent.glob("*.h"))]:
        digest.update(path.read_bytes())
    return f"{name}_{isa}_{digest.hexdigest()[:12]}"


STALE_LOCK_S = 900  # far longer than a build: such a lock was left by a build that was killed


def clear_stale_lock(module_name: str, build_root: Path | None = None) -> bool:
    """Removes the lock a killed build left in the extension's build directory: torch waits on a lock without
    a timeout, so every later start would hang. True when one was removed."""
    if build_root is None:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(module_name, verbose=False)) / "lock"
    else:
        lock = build_root / module_name / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False
    log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


def build(name: str, source: Path, isa: str | None = None) -> ModuleType | None:
    """The compiled extension `name` from `source` for `isa` (default: the widest this CPU has), or None
    (not x86 with AVX2/FMA, no compiler)."""
    isa = isa or best_isa()
    if platform.machine() not in X86 or isa is None or not ISAS[isa][0] <= cpu_flags():
        return None
    module_name = versioned_name(name, source, isa)
    try:
        module = prebuilt(module_name) or built_here(module_name)
        if module is not None:
            return module
        from torch.utils.cpp_extension import load

        clear_stale_lock(module_name)
        return load(
            module_name, [str(source)], extra_cflags=FLAGS + ISAS[isa][1], extra_ldflags=["-fopenmp"], verbose=False
        )
    except Exception as error:  # no compiler, no headers: the stock path serves instead
        log.warning("native kernel %s unavailable, using torch: %s", name, str(error).splitlines()[0])
        return None


def prebuilt(module_name: str) -> ModuleType | None:
    """`module_name` as `build_ahead` left it at the top of TORCH_EXTENSIONS_DIR, imported, or None: an image
    ships its kernels there, read-only and with no compiler to build them again."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    path = _built(module_name, Path(root)) if root else None
    if path is None:
        if root:
            log.info("no prebuilt %s in %s, building it", module_name, root)
        return None
    return _import(module_name, path)


def built_here(module_name: str) -> ModuleType | None:
    """`module_name` as an earlier build on this machine left it in torch's build directory, imported without
    torch's build lock (its name holds the hash of its sources and flags, so a file of that name is current): a
    start killed while holding that lock would leave every later start waiting on it. None if there is no such
    file or it cannot be imported (a build cut short), and torch builds it again."""
    from torch.utils.cpp_extension import _get_build_directory

    path = _built(module_name, Path(_get_build_directory(module_name, verbose=False)))
    try:
        return _import(module_name, path) if path is not None else None
    except ImportError as error:
        log.warning("rebuilding %s: %s", module_name, error)
        return None


def _import(module_name: str, path: Path) -> ModuleType:
    import torch  # noqa: F401  the extension takes libtorch's symbols from the loaded torch

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ahead(directory: Path, sources: list[Path] | None = None, isas: list[str] | None = None) -> list[Path]:
    """Compile each kernel (`boomerang_<stem>` from every .cpp here) for each vector set into `directory`,
    without importing them: the building CPU may lack a set the serving CPU has."""
    sources = sources or sorted(Path(__file__).parent.glob("*.cpp"))
    jobs = [(f"boomerang_{source.stem}", source, isa) for source in sources for isa in isas or ISAS]
    return [_compile(versioned_name(name, source, isa), source, ISAS[isa][1], directory) for name, source, isa in jobs]


def _compile(module_name: str, source: Path, isa_flags: list[str], directory: Path) -> Path:
    if built := _built(module_name, directory):
        return built  # the name holds the hash of the sources and flags: same name, same build
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -g0: the interpreter's own CFLAGS ask for debug info, which would make each file many times larger
    extension = CppExtension(
        module_name, [str(source)], extra_compile_args=FLAGS + isa_flags + ["-g0"], extra_link_args=["-fopenmp"]
    )
    distribution = Distribution(
        {"name": module_name, "ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}
    )
    with tempfile.TemporaryDirectory() as temp:  # one per build: the same .cpp's objects must not be shared
        command = distribution.get_command_obj("build_ext")
        command.build_lib, command.build_temp = str(directory), temp
        distribution.run_command("build_ext")
    return _built(module_name, directory)


def _built(module_name: str, directory: Path) -> Path | None:
    paths = (directory / f"{module_name}{suffix}" for suffix in EXTENSION_SUFFIXES)
    return next((path for path in paths if path.is_file()), None)


def main(argv: list[str]) -> None:
    Path(argv[0]).mkdir(parents=True, exist_ok=True)  # an image copies it on every platform, empty or not
    if platform.machine() not in X86:
        print(f"no native kernels for {platform.machine()}: torch serves")
        return
    for built in build_ahead(Path(argv[0]), isas=argv[1:] or None):
        print(built)


if __name__ == "__main__":
    main(sys.argv[1:])
