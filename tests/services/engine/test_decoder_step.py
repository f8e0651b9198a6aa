"""The native decode step against the transformers forward it replaces, on tiny random models."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from services.cpu.fast_linear import enable_fast_linear
from services.cpu.kernels.decoder_step import load_decoder_step
from services.engine.batch import DecodeBatch, Sequence
from services.engine.decoder_step import decoder_step
from services.engine.interface import SamplingParams
from services.family import load_family
from services.family.compat import cache_argument_name
from services.family.kv_slots import SlotCache

pytestmark = pytest.mark.skipif(load_decoder_step() is None, reason="no C++ compiler or no AVX2/FMA here")

# Even sizes, and odd ones: rows not a multiple of 8, inputs with a tail after the 8-wide loop, a head
# dimension with a tail after the 32-wide blocks of the attention's weighted sum.
SHAPES = {"even": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32),
          "odd": dict(hidden_size=44, intermediate_size=90, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=38)}


def _model(model_type: str, shape: str, **extra):
    config = AutoConfig.for_model(model_type, vocab_size=97, num_hidden_layers=3, max_position_embeddings=256,
                                  **SHAPES[shape], **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # they start at 1 and 0: make them matter
                param.add_(0.1 * torch.randn_like(param))
    enable_fast_linear(model)
    return model


def _prefilled(model, rows: list[list[int]]):
    """A left-padded batch run through the transformers forward: (cache, mask [B, n], positions [B, 1])."""
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])  # [B, longest]
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])  # [B, longest]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, longest]
    cache = SlotCache(model.config, {i: i for i in range(model.config.num_hidden_layers)})
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
          **{cache_argument_name(type(model)): cache})
    return cache, mask, positions[:, -1:]


@pytest.mark.parametrize("shape", ["even", "odd"])
@pytest.mark.parametrize(("model_type", "extra"), [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                                   ("llama", {"attention_bias": True})])
@torch.inference_mode()
def test_native_steps_match_the_transformers_forward(model_type, extra, shape):
    model = _model(model_type, shape, **extra)
    step = decoder_step(model)
    assert step is not None
    rows = [[5, 9, 14, 2, 7, 31, 8], [3, 4], [11, 12, 13, 60]]
    ours, mask, positions = _prefilled(model, rows)
    theirs, _, _ = _prefilled(model, rows)
    tokens = torch.tensor([[1], [2], [3]])  # [B, 1]
    for _ in range(6):
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)  # [B, seen]
        positions = positions + 1
        assert step.accepts(len(rows), ours)
        got = step.step(tokens, positions, mask, ours)  # [B, vocab]
        want = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_argument_name(type(model)): theirs}).logits[:, -1]  # [B, vocab]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1, keepdim=True)
    for a, b in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)  # [B, kv_heads, seen, head_dim]
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_step(threads):
    """Each thread attends a share of the positions and the parts are put together: one part, or more parts
    than cores, must match the transformers forward as the default count does."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        test_native_steps_match_the_transformers_forward("llama", {}, "odd")
    finally:
        torch.set_num_threads(before)


def _greedy(model, tokenizer, prompts: list[list[int]], native: bool) -> tuple[list[list[int]], bool]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outputs = [[] for _ in prompts]
    seqs = [Sequence(p, params, lambda delta, out=out: out.extend(delta.token_ids)) for p, out in zip(prompts, outputs)]
    batch = DecodeBatch(model, seqs, tokenizer, {2}, pad_id=0)
    if not native:
        batch.decoder_step = None
    batch.prefill()
    took_native = batch.decoder_step is not None and batch.decoder_step.accepts(len(seqs), batch.cache)
    while not batch.done:
        batch.step()
    return outputs, took_native


def test_engine_batches_take_native_steps_with_the_same_greedy_tokens(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    prompts = [[5, 9, 14, 2, 7, 31], [40, 41], [7, 8, 9]]
    for n in family.sizes:
        model = family.variant(n)
        native, took_native = _greedy(model, family.tokenizer, prompts, native=True)
        stock, _ = _greedy(model, family.tokenizer, prompts, native=False)
        assert took_native and native == stock


def test_not_used_where_it_does_not_apply(llama_pair):
    stock = load_family(*llama_pair, device="cpu", native_kernels=False)
    assert decoder_step(stock.variant(stock.sizes[0])) is None
    neox = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_neox", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4)).eval()
    enable_fast_linear(neox)
    assert decoder_step(neox) is None
    assert decoder_step(_model("llama", "even", hidden_act="gelu")) is None
    mistral = _model("mistral", "even", sliding_window=16)
    assert decoder_step(mistral) is None


def _run(model, tokenizer, prompts, params, greedy_steps: int):
    """Token ids and finish reasons of a batch run with this many steps per native call."""
    outputs, reasons = [[] for _ in prompts], [None] * len(prompts)

    def collect(row):
        def emit(delta):
            outputs[row].extend(delta.token_ids)
            reasons[row] = delta.finish_reason or reasons[row]
        return emit
    batch = DecodeBatch(model, [Sequence(p, params, collect(i)) for i, p in enumerate(prompts)], tokenizer, {2},
                        pad_id=0, greedy_steps=greedy_steps)
    batch.prefill()
    calls = 0
    while not batch.done:
        batch.step()
        calls += 1
    return outputs, reasons, calls


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_several_greedy_steps_per_call_choose_what_single_steps_choose(tiny_pair, ignore_eos):
    family = load_family(*tiny_pair, device="cpu")
    prompts = [[5, 9, 14, 2, 7, 31], [40, 41], [7, 8, 9]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=ignore_eos)
    model = family.variant(family.sizes[1])
    single = _run(model, family.tokenizer, prompts, params, 1)
    several = _run(model, family.tokenizer, prompts, params, 8)
    assert several[:2] == single[:2]
    assert several[2] < single[2]  # fewer calls: up to 8 steps each


@torch.inference_mode()
def test_greedy_steps_end_once_every_live_row_has_stopped():
    model = _model("llama", "even")
    step = decoder_step(model)
    rows = [[5, 9, 14, 2, 7, 31, 8], [3, 4]]
    cache, mask, positions = _prefilled(model, rows)
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)  # [B, seen]
    start = torch.tensor([1, 2])
    free = step.greedy_steps(start, positions + 1, mask, cache, 6, [], [True, True])  # [6, B]
    assert free.shape == (6, 2)
    cache, _, _ = _prefilled(model, rows)
    stop = [int(free[1, 0]), int(free[2, 1])]  # row 0 stops at step 2 at the latest, row 1 at step 3
    stopped = step.greedy_steps(start, positions + 1, mask, cache, 6, stop, [True, True])
    ends = [min(i for i in range(6) if int(free[i, b]) in stop) for b in range(2)]
    assert torch.equal(stopped, free[: max(ends) + 1])
    assert cache.layers[0].keys.shape[-2] == mask.shape[1] + max(ends)  # one position per step taken
    cache, _, _ = _prefilled(model, rows)
    only_row_0 = step.greedy_steps(start, positions + 1, mask, cache, 6, stop, [True, False])  # row 1 finished
    assert torch.equal(only_row_0, free[: ends[0] + 1])
