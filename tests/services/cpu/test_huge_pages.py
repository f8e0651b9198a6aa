"""Weights moved onto 2 MiB pages: same values, shared tensors still shared, one advised mapping."""

import torch
from torch import nn

from services.cpu import huge_pages
from services.cpu.huge_pages import HUGE_PAGE, move_to_huge_pages


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    first = nn.Sequential(nn.Embedding(300, 64), nn.Linear(64, 1024), nn.Linear(1024, 300, bias=False))
    second = nn.Sequential(nn.Linear(64, 64))
    first[2].weight = nn.Parameter(first[0].weight.detach().clone().repeat(1, 16))  # [300, 1024]
    second[0].weight = nn.Parameter(first[1].weight[:64].detach().clone())  # a parameter of its own
    shared = nn.Linear(1024, 300, bias=False)
    shared.weight = first[2].weight  # one tensor in two models, as a shared output layer
    second.append(shared)
    return first, second


def test_values_sharing_and_layout_survive_the_move(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    first, second = _models()
    x = torch.randint(0, 300, (3,))
    before = [p.detach().clone() for p in [*first.parameters(), *second.parameters()]]
    want = first(x)  # [3, 300]
    moved = move_to_huge_pages([first, second], min_bytes=0)
    after = [*first.parameters(), *second.parameters()]
    assert moved >= sum(p.nbytes for p in first.parameters()) + second[0].weight.nbytes
    for old, new in zip(before, after):
        assert torch.equal(old, new)
    assert second[1].weight.data_ptr() == first[2].weight.data_ptr()  # still one tensor
    pointers = sorted(p.data_ptr() for p in after)
    assert pointers[0] % HUGE_PAGE == 0 and pointers[-1] - pointers[0] < moved  # one mapping, in order
    torch.testing.assert_close(first(x), want)


def test_without_huge_pages_each_tensor_is_still_copied_once_and_shared_ones_stay_shared(monkeypatch):
    """The loaded weights may sit on the file's pages: they get memory of their own either way."""
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    first, second = _models()
    before = [(p.data_ptr(), p.detach().clone()) for p in [*first.parameters(), *second.parameters()]]
    assert move_to_huge_pages([first, second], min_bytes=0) == 0
    for (pointer, value), param in zip(before, [*first.parameters(), *second.parameters()]):
        assert param.data_ptr() != pointer and torch.equal(param, value)
    assert second[1].weight.data_ptr() == first[2].weight.data_ptr()


def test_small_tensors_get_plain_memory_of_their_own(monkeypatch):
    """Off the mapping, but off the loaded file too: one tensor left there keeps the whole file resident."""
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    first, _ = _models()
    small, value = first[1].bias.data_ptr(), first[1].bias.detach().clone()  # 4 KiB
    moved = move_to_huge_pages([first])
    big = first[1].weight.data_ptr()
    assert first[1].bias.data_ptr() != small and torch.equal(first[1].bias, value)
    assert not big <= first[1].bias.data_ptr() < big + moved and big % 64 == 0
