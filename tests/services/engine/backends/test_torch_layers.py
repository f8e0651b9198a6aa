"""The torch backend (the groups' own decoder layers on the batch's KV buffers) against the transformers
forward of each size, for every architecture of the table, with native kernels off."""

from types import SimpleNamespace

import pytest
import torch

from services.engine.backends.torch_layers import LayerStep, allowed_keys
from services.engine.batch import Sequence
from services.engine.family_batch import FamilyBatch
from services.engine.interface import SamplingParams
from services.errors import UnsupportedArchitectureError
from services.family import load_family
from services.family.architectures import ARCHITECTURES
from tests.conftest import make_pair
from tests.services.engine.reference import greedy_tokens, record_logits, step_logits

WINDOW = 4  # shorter than the prompts and answers below: the window hides keys
CASES = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "gpt_neox": ("gpt_neox", {}),
         "mistral": ("mistral", {"sliding_window": None}),
         "mistral_window": ("mistral", {"sliding_window": WINDOW}),
         "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 4})}
PROMPTS = [[5, 17, 42], [99, 7, 3, 250, 61, 11, 8], [12, 40]]


def test_every_architecture_of_the_table_is_covered():
    assert {model_type for model_type, _ in CASES.values()} == set(ARCHITECTURES)


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    model_type, config = CASES[request.param]
    family = load_family(*make_pair(tmp_path_factory.mktemp(request.param), model_type, **config), device="cpu",
                         native_kernels=False)
    family.case = request.param
    return family


def _sequences(family, sizes, prompts, max_tokens):
    outputs = [[] for _ in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [Sequence(list(p), params, lambda delta, out=out: out.extend(delta.token_ids), num_layers=n)
            for n, p, out in zip(sizes, prompts, outputs)]
    return seqs, outputs


def test_steps_and_a_join_match_the_transformers_forward_of_each_size(family):
    small, large, middle = family.sizes[0], family.sizes[-1], family.sizes[len(family.sizes) // 2]
    record = {}
    seqs, outputs = _sequences(family, [small, large, middle], PROMPTS, 10)
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    record_logits(batch, record)
    batch.prefill()
    assert all(type(group.decode) is LayerStep for branches in batch.groups for group in branches)
    for _ in range(3):
        batch.step()
    late, late_outputs = _sequences(family, [middle, small], [list(range(20, 32)), [8, 9]], 6)
    newcomers = FamilyBatch(family, late, family.tokenizer, {2}, pad_id=0, pool=batch.pool)
    record_logits(newcomers, record)
    newcomers.prefill()
    batch.join(newcomers)  # a longer prompt than the batch has filled, and a shorter one
    while not batch.done:
        batch.step()
    if "window" in family.case:
        assert WINDOW in {w for branches in batch.groups for g in branches for w in g.decode.windows}
    for seq, got in zip(seqs + late, outputs + late_outputs):
        model = family.variant(seq.num_layers)
        assert got == greedy_tokens(model, seq.prompt_ids, len(got)), (family.case, seq.num_layers)
        torch.testing.assert_close(torch.stack(record[id(seq)]), step_logits(model, seq.prompt_ids, got),
                                   rtol=1e-4, atol=1e-4)


def test_allowed_keys_hide_padding_later_keys_and_keys_beyond_the_window():
    filled = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # [rows, keys]
    full = allowed_keys(filled, torch.arange(6), None)  # [rows, queries, keys]
    assert full[0, 0].tolist() == [True] + [False] * 5  # a padding query attends itself only
    assert full[0, 3].tolist() == [False, False, True, True, False, False]
    assert full[1].equal(torch.ones(6, 6, dtype=torch.bool).tril())
    windowed = allowed_keys(filled, torch.tensor([5]), 2)  # one query at position 5
    assert windowed[:, 0].tolist() == [[False] * 4 + [True] * 2] * 2


def test_an_attention_whose_mask_we_do_not_build_is_refused_at_start():
    attention = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2", model_type="llama"))
    with pytest.raises(UnsupportedArchitectureError, match="flash_attention_2"):
        LayerStep([SimpleNamespace(self_attn=attention)], "self_attn")


def test_another_dtype_runs_through_the_same_layers(llama_pair):
    """bf16 on CPU (as on a GPU): the torch backend, logits close to the variant's own bf16 forward."""
    family = load_family(*llama_pair, device="cpu", dtype="bfloat16")
    record = {}
    seqs, outputs = _sequences(family, [family.sizes[0], family.sizes[-1]], PROMPTS[:2], 6)
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    record_logits(batch, record)
    batch.prefill()
    while not batch.done:
        batch.step()
    assert {type(group.decode) for branches in batch.groups for group in branches} == {LayerStep}
    for seq, got in zip(seqs, outputs):
        want = step_logits(family.variant(seq.num_layers), seq.prompt_ids, got)
        torch.testing.assert_close(torch.stack(record[id(seq)]), want, rtol=0.05, atol=0.1)
