"""A model family: one teacher, one student, and every size between them assembled on demand
(`load_family`, re-exported by `services.family`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from services.cpu.fast_linear import enable_fast_linear, native_kernels_wanted
from services.cpu.huge_pages import move_to_huge_pages
from services.errors import InvalidPairError, UnknownSizeError
from services.family.architectures import ArchitectureSpec, get_path, number_layers, spec_for
from services.family.assembly import assemble_variant, make_template
from services.family.calibration import quantize_family_int8, quantize_family_q4
from services.family.int8 import Int8Linear, float_dtype
from services.family.loading import (
    check_pair,
    check_tokenizers,
    default_device,
    load_model,
    load_tokenizer,
    parse_dtype,
    read_layout,
    read_model_config,
    swap_parameters,
)
from services.family.plan import STUDENT, TEACHER, Order, StudentLayout, VariantPlan, parse_order, plan_family
from services.family.q4 import Q4Linear
from services.store import DEFAULT_PAIR, Manifest, resolve_student, resolve_teacher

DEFAULT_VARIANT_CACHE_SIZE = 32


def assign_cache_slots(teacher: nn.Module, student: nn.Module, spec: ArchitectureSpec) -> None:
    """Give each layer module a fixed unique KV slot: teacher 0..N-1, student N..N+S-1 (done once, at load)."""
    number_layers(student, spec.layers, first=len(get_path(teacher, spec.layers)))


def share_identical_parameters(teacher: nn.Module, student: nn.Module) -> int:
    """Point student parameters that are bit-identical to the teacher's same-named ones (embeddings kept
    frozen in training) at the teacher's tensors; returns the bytes this saves. Tied parameters stay tied."""
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))

    def identical(name: str, param: nn.Parameter) -> nn.Parameter | None:
        other = teacher_params.get(name)
        same = (
            other is not None
            and other.shape == param.shape
            and other.dtype == param.dtype
            and torch.equal(other, param)
        )
        return other if same else None

    return sum(p.numel() * p.element_size() for p in swap_parameters(student, identical))


@dataclass(frozen=True)
class SizeInfo:
    """What a size costs: its parameters and their bytes (shared with the other sizes)."""

    num_layers: int
    patched_blocks: int
    parameters: int
    bytes: int


class Family:
    """Teacher + student + plans; `variant(n)` assembles (and caches) the n-layer model."""

    def __init__(
        self,
        name: str,
        teacher: nn.Module,
        student: nn.Module,
        layout: StudentLayout,
        order: Order | str,
        tokenizer=None,
        cache_size: int = DEFAULT_VARIANT_CACHE_SIZE,
        quality: dict | None = None,
        sampling_defaults: dict | None = None,
    ):
        self.name = name
        self.teacher, self.student, self.layout = teacher, student, layout
        self.order = parse_order(order)
        self.spec = spec_for(teacher.config.model_type)
        self.tokenizer = tokenizer
        self.quality = quality or {}
        self.sampling_defaults = sampling_defaults or {}  # the pair's, for requests that set none
        self.plans: dict[int, VariantPlan] = plan_family(layout, self.order)
        self.cache_size = max(1, cache_size)
        self._variants: OrderedDict[int, nn.Module] = OrderedDict()
        self._lock = threading.Lock()
        self._size_info: dict[int, SizeInfo] = {}
        assign_cache_slots(teacher, student, self.spec)
        self.shared_bytes = share_identical_parameters(teacher, student)
        self._template = make_template(teacher, student)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.plans)

    @property
    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (int8 weights are not float)."""
        return float_dtype(self.teacher)

    @property
    def weights(self) -> str:
        """How the matrices are held (`WEIGHT_FORMS`): "q4" where any is 4-bit, "int8" where any is int8."""
        kinds = {type(module) for module in self.teacher.modules()}
        return "q4" if Q4Linear in kinds else "int8" if Int8Linear in kinds else "float"

    def plan(self, num_layers: int) -> VariantPlan:
        if num_layers not in self.plans:
            raise UnknownSizeError(
                f"no {num_layers}-layer model in this family; sizes are {self.sizes}", param="num_layers"
            )
        return self.plans[num_layers]

    def assemble(self, plan: VariantPlan) -> nn.Module:
        """A variant for any plan (not only the family's own), uncached: for searches over plans."""
        return assemble_variant(plan, self.teacher, self.student, self.spec, self._template)

    def variant(self, num_layers: int) -> nn.Module:
        """The n-layer model, assembled on first use and kept in a bounded LRU cache."""
        plan = self.plan(num_layers)
        with self._lock:
            if num_layers in self._variants:
                self._variants.move_to_end(num_layers)
                return self._variants[num_layers]
            model = self.assemble(plan)
            self._variants[num_layers] = model
            while len(self._variants) > self.cache_size:
                self._variants.popitem(last=False)  # drops the shell only; layers stay with teacher/student
            return model

    def cached_sizes(self) -> list[int]:
        with self._lock:
            return list(self._variants)

    def size_info(self, num_layers: int) -> SizeInfo:
        """Parameters and bytes of one size (counted once per size: plans and weights never change)."""
        if num_layers not in self._size_info:
            self._size_info[num_layers] = self._count(num_layers)
        return self._size_info[num_layers]

    def _count(self, num_layers: int) -> SizeInfo:
        plan = self.plan(num_layers)
        sources = {TEACHER: self.teacher, STUDENT: self.student}
        modules = [get_path(sources[ref.source], self.spec.layers)[ref.index] for ref in plan.layers]
        modules += [
            get_path(sources[plan.embed], self.spec.embed),
            get_path(sources[plan.norm], self.spec.norm),
            get_path(sources[plan.head], self.spec.head),
        ]
        params = {id(p): p for module in modules for p in module.parameters()}
        parameters = sum(p.numel() for p in params.values())
        return SizeInfo(num_layers, plan.patched_blocks, parameters, _distinct_bytes(modules))

    def weights_bytes(self) -> int:
        """Bytes of the teacher's and the student's distinct tensors, all sizes together."""
        return _distinct_bytes([self.teacher, self.student])

    def model_id(self, num_layers: int) -> str:
        return f"{self.name}-{num_layers}L"


def _distinct_bytes(modules: list[nn.Module]) -> int:
    """Parameters and buffers (the scales of quantized weights are buffers), each shared tensor once."""
    tensors = {t.data_ptr(): t.numel() * t.element_size()
               for module in modules for t in (*module.parameters(), *module.buffers())}
    return sum(tensors.values())


QUANTIZERS = {"int8": quantize_family_int8, "q4": quantize_family_q4}  # weight form -> in-place quantizer of a family


def load_family(
    teacher: str | Path | None = None,
    student: str | Path | None = None,
    *,
    pair: str | Path | None = None,
    order: str | Sequence[int] | None = None,
    dtype: str | None = None,
    device: str | None = None,
    cache_size: int = DEFAULT_VARIANT_CACHE_SIZE,
    name: str | None = None,
    native_kernels: bool | None = None,
    weights: str = "float",
) -> Family:
    """Load a pair from two HF folders (paper layout) or a `models_store` pair folder (default pair if none).
    `weights`: "float" (as loaded, in `dtype`), "int8" (every matrix and embedding with per-row scales) or "q4"
    (matrices in 4-bit blocks, embeddings int8); see `WEIGHT_FORMS`."""
    quality, sampling_defaults = {}, {}
    if teacher is None and student is None:
        manifest = Manifest.read(Path(pair) if pair else DEFAULT_PAIR)
        teacher = resolve_teacher(manifest)
        student = resolve_student(manifest, teacher)
        order, dtype = order or manifest.order, dtype or manifest.dtype
        name, quality = name or manifest.name, manifest.quality
        sampling_defaults = manifest.sampling_defaults
    elif teacher is None or student is None:
        raise InvalidPairError("give both teacher and student folders, or a pair folder")
    teacher, student = Path(teacher), Path(student)
    teacher_config, student_config = read_model_config(teacher), read_model_config(student)
    layout = read_layout(student, teacher_config["num_hidden_layers"])
    check_pair(teacher_config, student_config, layout)
    tokenizer = load_tokenizer(teacher)
    if (student / "tokenizer_config.json").exists():
        check_tokenizers(tokenizer, load_tokenizer(student))
    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    on_cpu = torch.device(device).type == "cpu"
    teacher_model, student_model = (
        load_model(folder, torch_dtype, device, fresh_memory=not on_cpu) for folder in (teacher, student)
    )
    native = native_kernels_wanted() if native_kernels is None else native_kernels
    if native and on_cpu and torch_dtype == torch.float32:
        enable_fast_linear(teacher_model, student_model)
    family = Family(
        name or f"{teacher.name}-boomerang",
        teacher_model,
        student_model,
        layout,
        order or "last",
        tokenizer,
        cache_size,
        quality,
        sampling_defaults,
    )
    if weights != "float":  # after the pair's identical tensors are shared: each is quantized once
        QUANTIZERS[weights](family, use_kernel=native and on_cpu and torch_dtype == torch.float32)
    if on_cpu:
        move_to_huge_pages([teacher_model, student_model])  # the one copy of the loaded weights
    return family
