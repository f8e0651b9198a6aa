"""The Dockerfiles, checked without a Docker engine: hadolint, what each stage holds, every file they copy, and
the build stage's kernel command run here in the venv, its output then found by the runtime's lookup."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.cpu.kernels import build as kernel_build

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
RUNTIME_LOOKUP = """
from pathlib import Path
from torch.utils import cpp_extension
from services.cpu.kernels import build, decoder_step, gemv

def no_compiler(*args, **kwargs):
    raise RuntimeError("no compiler in the runtime image")

cpp_extension.load = no_compiler
build.cpu_flags = lambda: {"avx2", "fma", "f16c"}
for module in (gemv._module(), decoder_step.load_decoder_step()):
    print(Path(module.__file__).parent if module is not None else None)
"""
COMPILERS = re.compile(r"(?<![\w+-])(g\+\+|gcc|clang|build-essential|cmake)(?![\w+-])")


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / dockerfile).read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def _stages(dockerfile: str) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions by its `AS` name."""
    stages, current = {}, None
    for instruction, arguments in _instructions(dockerfile):
        if instruction == "FROM":
            current = stages.setdefault(arguments.split()[-1], [])
        elif current is not None:
            current.append((instruction, arguments))
    return stages


def _base_images(dockerfile: str) -> set[str]:
    """The images the stages start from, build arguments' defaults put in."""
    instructions = _instructions(dockerfile)
    defaults = dict(re.match(r"(\w+)=(\S+)", a).groups() for i, a in instructions if i == "ARG" and "=" in a)
    images = {a.split()[0] for i, a in instructions if i == "FROM"}
    return {re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image) for image in images}


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(pair.split("=", 1) for i, a in instructions if i == "ENV" for pair in shlex.split(a))


def _kernel_command(dockerfile: str) -> list[str]:
    (command,) = [shlex.split(a) for i, a in _stages(dockerfile)["build"]
                  if i == "RUN" and "services.cpu.kernels.build" in a]
    return command


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_dockerfile_passes_hadolint(dockerfile):
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed")
    result = subprocess.run([binary, str(REPO / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_runtime_stage_runs_as_a_user_with_a_healthcheck_and_no_compiler(dockerfile):
    stages = _stages(dockerfile)
    assert list(stages) == ["build", "runtime"], "the runtime must be the last stage, the one `docker build` tags"
    runtime = stages["runtime"]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] not in ("0", "root")
    (healthcheck,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/ready" in healthcheck
    assert not [a for i, a in runtime if i == "RUN" and COMPILERS.search(a)]
    assert [a for i, a in stages["build"] if i == "RUN" and COMPILERS.search(a)], "the kernels need a compiler"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_base_images_are_pinned_by_exact_tag_or_digest(dockerfile):
    images = _base_images(dockerfile)
    assert images
    for image in images:
        assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), image


def test_the_cuda_image_uses_the_torch_of_its_base_and_the_range_the_project_allows():
    """The PyTorch image's torch is kept (a constraint pins pip to it), and it lies in pyproject's range."""
    (image,) = _base_images("Dockerfile.cuda")
    torch_version = tuple(int(p) for p in re.search(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda", image).groups())
    pins = re.search(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (REPO / "pyproject.toml").read_text()).groups()
    low, high = tuple(map(int, pins[:2])), tuple(map(int, pins[2:]))
    assert low <= torch_version[:2] < high
    runs = " ".join(a for i, a in _stages("Dockerfile.cuda")["build"] if i == "RUN")
    assert "--system-site-packages" in runs and "--constraint" in runs and "pip install torch" not in runs


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_file_copied_from_the_context_exists_and_is_not_ignored(dockerfile):
    ignored = (REPO / ".dockerignore").read_text().split() if (REPO / ".dockerignore").exists() else []
    for instruction, arguments in _instructions(dockerfile):
        if instruction not in ("COPY", "ADD") or arguments.startswith("--from"):
            continue
        for source in shlex.split(arguments)[:-1]:
            assert (REPO / source).exists(), f"{dockerfile} copies missing {source}"
            assert source not in ignored, f"{dockerfile} copies {source}, which .dockerignore leaves out"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_runtime_imports_the_kernels_from_where_the_build_stage_put_them(dockerfile):
    directory = _kernel_command(dockerfile)[-1]
    runtime = _stages(dockerfile)["runtime"]
    assert _env(runtime)["TORCH_EXTENSIONS_DIR"] == directory
    assert f"--from=build {directory} {directory}" in [a for i, a in runtime if i == "COPY"]


def test_the_build_stage_kernel_command_builds_what_the_runtime_finds_with_no_compiler(request, tmp_path_factory):
    """The Dockerfiles' command, run here for AVX2 only (the AVX-512 builds are the same code with one more
    flag; tests/services/cpu/kernels builds and checks both where the CPU has them). The output is kept in
    pytest's cache: its names carry the hash of the sources and flags, so a changed kernel builds again."""
    if not kernel_build.ISAS["avx2"][0] <= kernel_build.cpu_flags():
        pytest.skip("no AVX2 here")
    commands = {tuple(_kernel_command(dockerfile)) for dockerfile in DOCKERFILES}
    (command,) = commands
    assert command[:3] == ("python", "-m", "services.cpu.kernels.build")
    cache = request.config.cache
    out = cache.mkdir("prebuilt-kernels") if cache is not None else tmp_path_factory.mktemp("kernels")
    result = subprocess.run([sys.executable, *command[1:-1], str(out), "avx2"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    _check_found_without_compiler(out)


def _check_found_without_compiler(directory: Path) -> None:
    """In a fresh process, as a container starts: both kernels come from `directory` and none is compiled."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(directory)}
    result = subprocess.run([sys.executable, "-c", RUNTIME_LOOKUP], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(directory)] * 2, result.stderr[-2000:]
