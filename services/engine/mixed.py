"""One batch of sequences of different sizes of a family, decoded together.

Every size is the student with some blocks patched back, so rows of any size walk the same student blocks
in the same order: at block i, the rows whose size keeps student layer i run it as one batch, and the rows
whose size patched it run the teacher layers of that block as another. A step reads each weight its rows
need once for the whole batch, where one batch per size would read the shared layers once per size.
Prefill runs per size through the transformers forward; each layer's KV rows are then copied into one
buffer per layer module (the rows that use it), which the native decode step appends to in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.architectures import get_path
from services.compat import cache_argument_name
from services.engine.batch import DecodeBatch, Sequence
from services.family import Family
from services.fused_decode import fused_decoder, layer_stack
from services.kernels.decoder_step import load_decoder_step
from services.kv_buffer import MIN_CAPACITY
from services.plan import STUDENT, TEACHER, block_choices
from services.rotary_table import rotary_lookup


@dataclass
class _Group:
    """Rows taking one branch of a block, and the layers of that branch with their KV buffers."""

    rows: torch.Tensor  # [rows] batch indices
    stack: object  # the kernel's LayerStack over the branch's layers
    keys: list[torch.Tensor]  # per layer: [rows, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]


def mixable(family: Family) -> bool:
    """Whether the family's sizes can share decode batches (the native decode step serves its layers)."""
    return load_decoder_step() is not None and all(
        fused_decoder(family.variant(n)) is not None for n in (family.sizes[0], family.sizes[-1]))


class MixedBatch(DecodeBatch):
    """Sequences of any sizes of `family` (`Sequence.num_layers`) that advance together."""

    def __init__(self, family: Family, sequences: list[Sequence], tokenizer, eos_ids: set[int], pad_id: int):
        super().__init__(family.variant(sequences[0].num_layers), sequences, tokenizer, eos_ids, pad_id)
        self.family, self.kernel = family, load_decoder_step()
        self.sizes = [seq.num_layers for seq in sequences]
        self.sources = {TEACHER: family.teacher, STUDENT: family.student}
        self.groups: list[list[_Group]] = []  # per student block
        self.length = 0  # KV positions filled
        self.rows_by_source = {part: self._by_source(part) for part in ("embed", "rotary", "head")}

    def _rows(self, predicate) -> torch.Tensor:
        return torch.tensor([row for row, n in enumerate(self.sizes) if predicate(n)], dtype=torch.long)

    def _layer(self, source: str, index: int):
        return get_path(self.sources[source], self.family.spec.layers)[index]

    @torch.inference_mode()
    def prefill(self) -> None:
        input_ids, position_ids = self._left_padded_prompts()  # [batch, longest] each
        longest = input_ids.shape[1]
        capacity = longest + min(max(seq.params.max_tokens for seq in self.sequences), MIN_CAPACITY) + 1
        prefilled = {}  # size -> (its rows, its cache)
        logits = None
        for n in sorted(set(self.sizes)):
            size_rows = self._rows(lambda m, n=n: m == n)
            model = self.family.variant(n)
            cache = model.new_cache()
            out = model(input_ids=input_ids[size_rows], attention_mask=self.attention_mask[size_rows],
                        position_ids=position_ids[size_rows], use_cache=True, logits_to_keep=1,
                        **{cache_argument_name(type(model)): cache})
            size_logits = out.logits[:, -1].float()  # [rows of size n, vocab]
            logits = size_logits.new_empty(len(self.sizes), size_logits.shape[-1]) if logits is None else logits
            logits[size_rows] = size_logits
            prefilled[n] = (size_rows, cache)
        self._build_groups(prefilled, capacity, longest)
        self.length = longest
        self._advance(logits)

    def _build_groups(self, prefilled: dict, capacity: int, longest: int) -> None:
        """Per block and branch: its rows, fused layers and KV buffers filled from the per-size prefill."""
        choices = {n: block_choices(self.family.layout, self.family.plan(n)) for n in set(self.sizes)}
        depth = {n: 0 for n in choices}  # position of the next layer in each size's plan
        for block, teacher_layers in enumerate(self.family.layout.blocks):
            branches = []
            for patched in (False, True):
                sizes = [n for n in choices if choices[n][block] == patched]
                if not sizes:
                    continue
                refs = [(TEACHER, t) for t in teacher_layers] if patched else [(STUDENT, block)]
                layers = [self._layer(*ref) for ref in refs]
                stack = layer_stack(self.kernel, layers, self.family.teacher.config)
                group = _Group(self._rows(lambda m, sizes=sizes: m in sizes), stack, [], [])
                for offset in range(len(refs)):
                    keys, values = self._gather_kv(group.rows, sizes, prefilled, depth, offset, capacity, longest)
                    group.keys.append(keys)
                    group.values.append(values)
                for n in sizes:
                    depth[n] += len(refs)
                branches.append(group)
            self.groups.append(branches)

    def _gather_kv(self, rows: torch.Tensor, sizes: list[int], prefilled: dict, depth: dict, offset: int,
                   capacity: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's KV buffers for `rows`, with each size's prefilled keys and values copied in."""
        where = {int(row): i for i, row in enumerate(rows)}
        keys = values = None
        for n in sizes:
            size_rows, cache = prefilled[n]
            layer = cache.layers[depth[n] + offset]  # keys: [rows of size n, kv_heads, longest, head_dim]
            if keys is None:
                shape = (len(rows), layer.keys.shape[1], capacity, layer.keys.shape[-1])
                keys, values = layer.keys.new_empty(shape), layer.values.new_empty(shape)
            index = torch.tensor([where[int(row)] for row in size_rows], dtype=torch.long)
            keys[index, :, :longest] = layer.keys
            values[index, :, :longest] = layer.values
        return keys, values

    @torch.inference_mode()
    def step(self) -> None:
        input_ids = self._next_input()[:, 0]  # [batch]
        hidden, cos, sin = self._embed(input_ids)  # [batch, hidden_size], [batch, head_dim] x2
        mask = self.attention_mask.to(torch.long).contiguous()  # [batch, seen]
        self._make_room()
        for branches in self.groups:
            for group in branches:
                h = hidden[group.rows].contiguous()  # [rows, hidden_size]
                m, c, s = mask[group.rows].contiguous(), cos[group.rows].contiguous(), sin[group.rows].contiguous()
                group.stack.step(h, group.keys, group.values, self.length, m, c, s)
                hidden[group.rows] = h
        self.length += 1
        self._advance(self._head(hidden))

    def _make_room(self) -> None:
        """Room for this step's keys and values: buffers double when full (like `GrowingLayer`), so a long
        `max_tokens` costs memory only as the batch actually grows."""
        for branches in self.groups:
            for group in branches:
                capacity = group.keys[0].shape[2]
                if self.length < capacity:
                    continue
                for buffers in (group.keys, group.values):
                    for i, old in enumerate(buffers):
                        grown = old.new_empty((*old.shape[:2], 2 * capacity, old.shape[-1]))
                        grown[:, :, :self.length] = old[:, :, :self.length]
                        buffers[i] = grown

    def _by_source(self, part: str) -> dict[str, torch.Tensor]:
        """Rows grouped by which model supplies `part` (embed, norm, head, rotary) of their size (see
        `rows_by_source`: computed once per batch)."""
        plans = {n: self.family.plan(n) for n in set(self.sizes)}
        groups = {}
        for source in (TEACHER, STUDENT):
            rows = self._rows(lambda n, source=source: getattr(plans[n], part) == source)
            if len(rows):
                groups[source] = rows
        return groups

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        spec, width = self.family.spec, self.family.teacher.config.hidden_size
        hidden = torch.empty(len(self.sizes), width, dtype=self.family.dtype)  # [batch, hidden_size]
        for source, rows in self.rows_by_source["embed"].items():
            hidden[rows] = get_path(self.sources[source], spec.embed)(input_ids[rows])
        cos = sin = None
        for source, rows in self.rows_by_source["rotary"].items():
            c, s = rotary_lookup(get_path(self.sources[source], spec.rotary))(self.positions[rows, 0])
            cos = c.new_empty(len(self.sizes), c.shape[-1]) if cos is None else cos  # [batch, head_dim]
            sin = s.new_empty(len(self.sizes), s.shape[-1]) if sin is None else sin
            cos[rows], sin[rows] = c, s
        return hidden, cos, sin

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab]: final norm and output layer of each row's size."""
        spec, logits = self.family.spec, None
        for source, rows in self.rows_by_source["head"].items():
            model = self.sources[source]
            norm, head = get_path(model, spec.norm), get_path(model, spec.head)
            part = self.kernel.norm_and_head(hidden[rows].contiguous(), norm.weight.detach(), norm.variance_epsilon,
                                             head.weight.detach())  # [rows, vocab]
            logits = part.new_empty(len(self.sizes), part.shape[-1]) if logits is None else logits
            logits[rows] = part
        return logits
