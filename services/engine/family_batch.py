"""The one batch class of the engine: sequences of any sizes of a family, decoded together, on any device.

Every size is the student with some blocks patched back, so rows of any size walk the same student blocks
in the same order: at block i, the rows whose size keeps student layer i run it as one group, and the rows
whose size patched it run the teacher layers of that block as another. A step reads each weight its rows
need once for the whole batch. A batch of one size is simply one whose rows all take the same branches.
Each group keeps one KV buffer per layer (its rows), taken from the pool. Consecutive groups that the same rows
take form a run, stepped in one call over all their layers: each decode step through the run's step backend,
the native kernel where it applies (fp32 CPU Llama-style layers), else the same decoder layers (`backends`);
prefill through the layers' own forward (`backends.torch_layers`), or the kernel for short prompts where it
applies (`backends.short_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.cpu.rotary_table import rotary_lookup
from services.engine.backends import steps_for
from services.engine.backends.native import NativeStep
from services.engine.backends.short_prompts import ShortPrompts
from services.engine.backends.torch_layers import LayerStep
from services.engine.batch import RowBatch, Sequence
from services.engine.kv_pool import KVPool
from services.family import Family
from services.family.architectures import get_path, kv_shape
from services.family.kv_buffer import MIN_CAPACITY
from services.family.plan import STUDENT, TEACHER, block_choices


@dataclass
class _Group:
    """Rows taking one branch of a block, and the layers of that branch with their KV buffers."""

    rows: torch.Tensor  # [rows] batch indices, on the family's device
    row_list: list[int]  # the same, for bookkeeping without a device sync
    modules: list[torch.nn.Module]  # the branch's decoder layers
    prefill: LayerStep | ShortPrompts  # their prefill backend
    decode: LayerStep | NativeStep  # their decode step backend
    keys: list[torch.Tensor]  # per layer: [rows, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]


@dataclass
class _Run:
    """Consecutive groups (one per block, blocks in order) that the same rows take: stepped in one backend
    call over all their layers, so a batch of one size is one kernel call per step."""

    groups: list[_Group]
    prefill: LayerStep | ShortPrompts
    decode: LayerStep | NativeStep

    @property
    def row_list(self) -> list[int]:
        return self.groups[0].row_list

    @property
    def rows(self) -> torch.Tensor:
        return self.groups[0].rows

    def keys(self) -> list[torch.Tensor]:  # read per call: `_make_room` replaces buffers in the groups' lists
        return [keys for group in self.groups for keys in group.keys]

    def values(self) -> list[torch.Tensor]:
        return [values for group in self.groups for values in group.values]


def _chains(groups: list[list[_Group]]) -> list[list[_Group]]:
    """The groups cut into chains of consecutive blocks whose groups have the same rows, in order of their
    first block: a row's layers still run in order, since rows of different chains never mix."""
    chains, open_chains = [], {}
    for branches in groups:
        extended = {}
        for group in branches:
            key = tuple(group.row_list)
            chain = open_chains.get(key)
            if chain is None or type(chain[-1].decode) is not type(group.decode):
                chain = []
                chains.append(chain)
            chain.append(group)
            extended[key] = chain
        open_chains = extended
    return chains


def _granular(capacity: int) -> int:
    """Capacities in whole granules: buffers come in few shapes, so blocks given back fit the next batches."""
    return -(-capacity // MIN_CAPACITY) * MIN_CAPACITY


def _give_back(pool: KVPool, groups: list[list[_Group]]) -> None:
    pool.give(buffer for branches in groups for group in branches for buffer in (*group.keys, *group.values))


def _aligned(mask_row: torch.Tensor, length: int) -> torch.Tensor:
    """A row's attention mask [filled] right-aligned at `length`: left-padded, or its leading padding cut."""
    kept = min(length, mask_row.shape[0])
    return torch.nn.functional.pad(mask_row[mask_row.shape[0] - kept:], (length - kept, 0))  # [length]


def rotary_at(rotary: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [rows, rotary dim] (fp32) at `positions` [rows], on their device: looked up in a table on
    CPU (`rotary_table`), else computed by the rotary module, as transformers does every step."""
    if positions.device.type == "cpu":
        return rotary_lookup(rotary)(positions)
    probe = torch.empty(len(positions), 1, 1, device=positions.device)  # the module reads only its dtype and device
    cos, sin = rotary(probe, positions[:, None])  # [rows, 1, rotary dim] each
    return cos[:, 0], sin[:, 0]


class FamilyBatch(RowBatch):
    """Sequences of any sizes of `family` (`Sequence.num_layers`) that advance together; new ones join
    between steps (`join`) where `joinable`. Prompts may be prefilled in chunks (`start_prefill`, then
    `prefill_chunk` until it returns True) between other batches' steps."""

    def __init__(self, family: Family, sequences: list[Sequence], tokenizer, eos_ids: set[int], pad_id: int,
                 joinable: bool = True, pool: KVPool | None = None):
        super().__init__(sequences, tokenizer, eos_ids, pad_id, family.device)
        self.joinable = joinable
        self.pool = pool if pool is not None else KVPool(family.dtype, device=family.device)
        self.family = family
        self.sizes = [seq.num_layers for seq in sequences]
        self.sources = {TEACHER: family.teacher, STUDENT: family.student}
        self.groups: list[list[_Group]] = []  # per student block
        self.runs: list[_Run] = []  # the groups in chains of the same rows (`_chains`)
        self.length = 0  # KV positions filled
        self._prompts: tuple[torch.Tensor, torch.Tensor] | None = None  # input and position ids while prefilling
        self._index_rows()

    def _index_rows(self) -> None:
        """Which rows take their embedding, rotary, norm and output layer from which model (per batch)."""
        self.rows_by_source = {part: self._by_source(part) for part in ("embed", "rotary", "norm", "head")}
        self.rows_by_head = self._by_head()

    def _rows(self, predicate) -> torch.Tensor:
        return torch.tensor([row for row, n in enumerate(self.sizes) if predicate(n)], dtype=torch.long,
                            device=self.device)

    def _runs(self) -> list[_Run]:
        """The batch's groups as runs: one backend over each chain's layers where that backend is the one
        its groups have (else each group alone)."""
        runs = []
        for chain in _chains(self.groups):
            if len(chain) > 1:
                prefill, decode = steps_for(self.family, [module for group in chain for module in group.modules])
                if type(decode) is type(chain[0].decode):
                    runs.append(_Run(chain, prefill, decode))
                    continue
            runs.extend(_Run([group], group.prefill, group.decode) for group in chain)
        return runs

    def _layer(self, source: str, index: int):
        return get_path(self.sources[source], self.family.spec.layers)[index]

    @torch.inference_mode()
    def prefill(self) -> None:
        """The whole prompt in one pass (`start_prefill`, then one `prefill_chunk` of every position)."""
        self.start_prefill()
        self.prefill_chunk()

    @torch.inference_mode()
    def start_prefill(self) -> None:
        """Takes the prompts' KV buffers; `prefill_chunk` then runs their positions."""
        input_ids, position_ids = self._left_padded_prompts()  # [batch, longest] each
        longest = input_ids.shape[1]
        capacity = longest + min(max(seq.params.max_tokens for seq in self.sequences), MIN_CAPACITY) + 1
        self.groups = self._build_groups(capacity)
        self.runs = self._runs()
        self._prompts = input_ids, position_ids
        self.length = 0

    @property
    def prompt_left(self) -> int:
        """Prompt positions not yet run (0 once the batch has its first tokens)."""
        return self._prompts[0].shape[1] - self.length if self._prompts is not None else 0

    @torch.inference_mode()
    def prefill_chunk(self, positions: int | None = None) -> bool:
        """The next `positions` prompt positions of every row (all that are left by default) through each run's
        prefill backend, on top of the keys and values of those before; after the last, every row's first
        token. True once the prompt is done."""
        input_ids, position_ids = self._prompts
        end = input_ids.shape[1] if positions is None else min(self.length + positions, input_ids.shape[1])
        ids, at = input_ids[:, self.length:end], position_ids[:, self.length:end]  # [batch, new] each
        hidden, position_embeddings = self._embed_prompts(ids, at)  # [batch, new, hidden]
        filled = self.attention_mask[:, :end]  # [batch, end]
        for run in self.runs:
            rows = run.rows
            cos, sin = (part[rows] for part in position_embeddings)  # [rows, new, rotary dim]
            hidden[rows] = run.prefill.run(hidden[rows], run.keys(), run.values(), self.length, filled[rows],
                                           at[rows], (cos, sin))
        self.length = end
        if end < input_ids.shape[1]:
            return False
        self._prompts = None
        self._advance(self._head(hidden[:, -1].contiguous()))
        return True

    def _build_groups(self, capacity: int) -> list[list[_Group]]:
        """Per block and branch: its rows, layers (and their step backends) and empty KV buffers (all given
        back to the pool if one cannot be had)."""
        choices = {n: block_choices(self.family.layout, self.family.plan(n)) for n in set(self.sizes)}
        kv_heads, head_dim = kv_shape(self.family.teacher.config)
        shape = (kv_heads, _granular(capacity), head_dim)
        groups, taken = [], []
        try:
            for block, teacher_layers in enumerate(self.family.layout.blocks):
                branches = []
                for patched in (False, True):
                    sizes = [n for n in choices if choices[n][block] == patched]
                    if not sizes:
                        continue
                    refs = [(TEACHER, t) for t in teacher_layers] if patched else [(STUDENT, block)]
                    modules = [self._layer(*ref) for ref in refs]
                    rows = self._rows(lambda m, sizes=sizes: m in sizes)
                    for _ in range(2 * len(refs)):
                        taken.append(self.pool.take((len(rows), *shape)))
                    buffers = taken[-2 * len(refs):]
                    prefill, decode = steps_for(self.family, modules)
                    branches.append(_Group(rows, rows.tolist(), modules, prefill, decode, buffers[::2], buffers[1::2]))
                groups.append(branches)
        except BaseException:
            self.pool.give(taken)
            raise
        return groups

    @torch.inference_mode()
    def join(self, newcomers: FamilyBatch) -> None:
        """Takes the rows of `newcomers` (prefilled, their first tokens chosen) into this batch between two
        steps; rows that have finished leave. Every live row's keys and values move into new buffers,
        right-aligned at the longest live row's context, the shorter ones left-padded as prompts are (masked),
        so all rows decode on together."""
        rows = [(batch, row) for batch in (self, newcomers) for row, seq in enumerate(batch.sequences)
                if not seq.done]
        sources = [(self, self.groups), (newcomers, newcomers.groups)]  # each batch with its groups before
        self.sequences = [batch.sequences[row] for batch, row in rows]
        self.sizes = [batch.sizes[row] for batch, row in rows]
        if not rows:  # everything finished: the batch is done
            newcomers.release()
            return
        # the longest live row sets the length: padding no live row needs is dropped, so a batch that joins
        # keep alive never grows past its rows' own context
        length = max(batch.span(row) for batch, row in rows)
        self.attention_mask = torch.stack([_aligned(batch.attention_mask[row], length)
                                           for batch, row in rows])  # [batch, length], left-padded
        self.positions = torch.stack([batch.positions[row] for batch, row in rows])  # [batch, 1]
        self.next_tokens = torch.stack([batch.next_tokens[row] for batch, row in rows])  # [batch]
        groups = self._build_groups(length + min(self._remaining(), MIN_CAPACITY) + 1)
        try:
            for block, branches in enumerate(groups):
                for group in branches:
                    for batch, old_groups in sources:
                        self._move_kv(group, old_groups[block], batch, rows, length)
        except BaseException:
            _give_back(self.pool, groups)  # the old groups stay, and go back when the batch is released
            raise
        for batch, old_groups in sources:
            _give_back(batch.pool, old_groups)
        self.groups, newcomers.groups = groups, []
        self.runs, newcomers.runs = self._runs(), []
        self.length = length
        self._index_rows()

    def _remaining(self) -> int:
        """The most tokens a live row may still produce."""
        return max((seq.params.max_tokens - len(seq.tracker.token_ids) for seq in self.sequences if not seq.done),
                   default=0)

    def release(self) -> None:
        """Gives the KV buffers back to the pool (the batch has ended)."""
        _give_back(self.pool, self.groups)
        self.groups, self.runs = [], []

    @staticmethod
    def _move_kv(group: _Group, old_branches: list[_Group], batch: FamilyBatch, rows: list, length: int) -> None:
        """Copies into `group` the keys and values of its rows that come from `batch` (`rows`: the new
        batch's (source batch, row there)), right-aligned at `length`."""
        old = next((g for g in old_branches if g.modules[0] is group.modules[0]), None)
        if old is None:
            return
        where = {row: i for i, row in enumerate(old.row_list)}  # batch row -> row of `old`'s buffers
        pairs = [(j, where[rows[new][1]]) for j, new in enumerate(group.row_list) if rows[new][0] is batch]
        if not pairs:
            return
        into, out_of = (torch.tensor(side, device=group.rows.device) for side in zip(*pairs))
        kept = min(length, batch.length)  # the last positions of `batch`: all its live rows' own
        for new_buffers, old_buffers in ((group.keys, old.keys), (group.values, old.values)):
            for target, source in zip(new_buffers, old_buffers):  # [rows, kv_heads, capacity, head_dim]
                target[into, :, length - kept:length] = source[out_of, :, batch.length - kept:batch.length]
                target[into, :, :length - kept] = 0  # masked, but weighted by zero: no NaN from a reused block

    def span(self, row: int) -> int:
        """Positions of `row`'s own context (prompt and tokens so far): the filled length less its left padding."""
        return self.length - int(self.attention_mask[row, :self.length].argmax())

    def _embed_prompts(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        """Prompt embeddings [batch, longest, hidden_size] and rotary (cos, sin) [batch, longest, rotary dim],
        each row from the model its size takes them from."""
        spec = self.family.spec
        hidden, = self._per_source("embed", lambda model, rows: (get_path(model, spec.embed)(input_ids[rows]),))
        position_embeddings = self._per_source(
            "rotary", lambda model, rows: get_path(model, spec.rotary)(hidden[rows], position_ids[rows]))
        return hidden, position_embeddings

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every live row: each run's step backend over the rows that take it."""
        input_ids = self._next_input()[:, 0]  # [batch]
        hidden, cos, sin = self._embed(input_ids)  # [batch, hidden_size], [batch, rotary dim] x2
        positions = self.positions[:, 0]  # [batch]
        mask = self.attention_mask.to(torch.long).contiguous()  # [batch, seen], once per step, not per group
        self._make_room()
        live = [not seq.done for seq in self.sequences]
        for run in self.runs:
            if not any(live[row] for row in run.row_list):  # only finished rows take it: weights unread
                continue
            if len(run.row_list) == len(self.sequences):  # every row takes it: no gather, no scatter
                hidden = run.decode.step(hidden, run.keys(), run.values(), self.length, mask, cos, sin, positions)
                continue
            rows = run.rows
            hidden[rows] = run.decode.step(hidden[rows], run.keys(), run.values(), self.length, mask[rows],
                                           cos[rows], sin[rows], positions[rows])
        self.length += 1
        self._advance(self._head(hidden))

    def _make_room(self) -> None:
        """Room for this step's keys and values: buffers double when full (like `GrowingLayer`), so a long
        `max_tokens` costs memory only as the batch actually grows, and never past what its rows may still
        produce."""
        remaining = self._remaining()
        live = [not seq.done for seq in self.sequences]
        for branches in self.groups:
            for group in branches:
                capacity = group.keys[0].shape[2]
                if self.length < capacity or not any(live[row] for row in group.row_list):  # room, or no write
                    continue
                grown_capacity = _granular(max(capacity + 1, min(2 * capacity, self.length + remaining + 1)))
                for buffers in (group.keys, group.values):
                    for i, old in enumerate(buffers):
                        grown = self.pool.take((*old.shape[:2], grown_capacity, old.shape[-1]))
                        grown[:, :, :self.length] = old[:, :, :self.length]
                        buffers[i] = grown
                        self.pool.give([old])

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

    def _per_source(self, part: str, compute) -> tuple[torch.Tensor, ...]:
        """`compute(model, rows)` -> tensors [rows, ...] for each model that supplies `part` to some rows,
        put together as tensors [batch, ...] in row order."""
        whole = None
        for source, rows in self.rows_by_source[part].items():
            pieces = compute(self.sources[source], rows)
            if whole is None:
                whole = tuple(piece.new_empty(len(self.sizes), *piece.shape[1:]) for piece in pieces)
            for target, piece in zip(whole, pieces):
                target[rows] = piece
        return whole

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's hidden states [batch, hidden_size] and rotary cos, sin [batch, rotary dim] (fp32)."""
        spec = self.family.spec
        hidden, = self._per_source("embed", lambda model, rows: (get_path(model, spec.embed)(input_ids[rows]),))
        cos, sin = self._per_source(
            "rotary", lambda model, rows: rotary_at(get_path(model, spec.rotary), self.positions[rows, 0]))
        return hidden, cos, sin

    def _by_head(self) -> list[tuple[torch.nn.Module, torch.Tensor]]:
        """(output layer, its rows), one entry per distinct output weight: a pair whose student shares the
        teacher's output layer (the default pair) reads it once per step for all rows."""
        heads: dict[tuple, tuple[torch.nn.Module, list[torch.Tensor]]] = {}
        for source, rows in self.rows_by_source["head"].items():
            head = get_path(self.sources[source], self.family.spec.head)
            bias = head.bias.data_ptr() if head.bias is not None else None
            heads.setdefault((head.weight.data_ptr(), bias), (head, []))[1].append(rows)
        return [(head, torch.cat(rows).sort().values) for head, rows in heads.values()]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] (fp32): final norm of each row's size, then its output layer."""
        spec = self.family.spec
        normed, = self._per_source("norm", lambda model, rows: (get_path(model, spec.norm)(hidden[rows]),))
        logits = None
        for head, rows in self.rows_by_head:
            piece = head(normed[rows].contiguous())  # [rows, vocab]
            if logits is None:
                logits = piece.new_empty(len(self.sizes), piece.shape[-1])
            logits[rows] = piece
        return logits.float()
