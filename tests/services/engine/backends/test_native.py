"""The native backend (`LayerStack.step`) against the transformers forward, and against the torch backend
on a Llama pair: the same tokens, close logits."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from services.cpu.fast_linear import enable_fast_linear
from services.cpu.kernels.decoder_step import load_decoder_step
from services.cpu.rotary_table import rotary_lookup
from services.engine.backends.native import NativeStep, native_step
from services.engine.backends.torch_layers import LayerStep
from services.engine.batch import Sequence
from services.engine.family_batch import FamilyBatch
from services.engine.interface import SamplingParams
from services.family import load_family
from services.family.compat import cache_argument_name
from services.family.kv_slots import SlotCache
from tests.services.engine.reference import record_logits

pytestmark = pytest.mark.skipif(load_decoder_step() is None, reason="no C++ compiler or no AVX2/FMA here")

# Even sizes, and odd ones: rows not a multiple of 8, inputs with a tail after the 8-wide loop, a head
# dimension with a tail after the 32-wide blocks of the attention's weighted sum.
SHAPES = {
    "even": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "odd": dict(hidden_size=44, intermediate_size=90, num_attention_heads=2, num_key_value_heads=1, head_dim=38),
}


def _model(model_type: str, shape: str, **extra):
    config = AutoConfig.for_model(
        model_type, vocab_size=97, num_hidden_layers=3, max_position_embeddings=256, **SHAPES[shape], **extra
    )
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
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument_name(type(model)): cache},
    )
    return cache, mask, positions[:, -1:]


def _buffers(cache, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's prefilled keys and values copied into buffers [B, kv_heads, capacity, head_dim]."""
    keys, values = [], []
    for layer in cache.layers:
        for out, filled in ((keys, layer.keys), (values, layer.values)):
            buffer = filled.new_zeros(*filled.shape[:2], capacity, filled.shape[-1])
            buffer[:, :, : filled.shape[2]] = filled
            out.append(buffer)
    return keys, values


@pytest.mark.parametrize("shape", ["even", "odd"])
@pytest.mark.parametrize(
    ("model_type", "extra"), [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"attention_bias": True})]
)
@torch.inference_mode()
def test_native_steps_match_the_transformers_forward(model_type, extra, shape):
    model = _model(model_type, shape, **extra)
    step = native_step(list(model.model.layers), model.config)
    assert step is not None
    rows = [[5, 9, 14, 2, 7, 31, 8], [3, 4], [11, 12, 13, 60]]
    theirs, mask, positions = _prefilled(model, rows)
    keys, values = _buffers(_prefilled(model, rows)[0], mask.shape[1] + 8)
    tokens = torch.tensor([[1], [2], [3]])  # [B, 1]
    for _ in range(6):
        length = mask.shape[1]
        mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)  # [B, seen]
        positions = positions + 1
        hidden = model.model.embed_tokens(tokens[:, 0])  # [B, hidden_size]
        cos, sin = rotary_lookup(model.model.rotary_emb)(positions[:, 0])  # [B, head_dim] each
        hidden = step.step(hidden, keys, values, length, mask, cos, sin, positions[:, 0])
        got = model.lm_head(model.model.norm(hidden))  # [B, vocab]
        want = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_argument_name(type(model)): theirs},
        ).logits[:, -1]  # [B, vocab]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tokens = want.argmax(-1, keepdim=True)
    for ours_keys, ours_values, layer in zip(keys, values, theirs.layers):
        seen = layer.keys.shape[2]
        torch.testing.assert_close(ours_keys[:, :, :seen], layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_values[:, :, :seen], layer.values, rtol=1e-4, atol=1e-5)


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


def test_not_used_where_it_does_not_apply(llama_pair):
    stock = load_family(*llama_pair, device="cpu", native_kernels=False)  # native kernels off
    assert native_step(list(stock.teacher.model.layers), stock.teacher.config) is None
    neox = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "gpt_neox", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    ).eval()
    enable_fast_linear(neox)
    assert native_step(list(neox.gpt_neox.layers), neox.config) is None
    gelu = _model("llama", "even", hidden_act="gelu")
    assert native_step(list(gelu.model.layers), gelu.config) is None
    mistral = _model("mistral", "even", sliding_window=16)  # the kernel does not mask a window
    assert native_step(list(mistral.model.layers), mistral.config) is None


def _run(family, with_join: bool) -> tuple[list[list[int]], list[torch.Tensor], set[type]]:
    """Every size's tokens and per-step logits through one batch (and a join), and the backends it used."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 17, 42], [99, 7, 3, 250, 61, 11, 8], [12], [40, 41, 42, 43, 44], [8, 9]]
    outputs, record, backends = [[] for _ in prompts], {}, set()
    sizes = [family.sizes[i % len(family.sizes)] for i in range(len(prompts))]
    seqs = [
        Sequence(list(p), params, lambda delta, out=out: out.extend(delta.token_ids), num_layers=n)
        for n, p, out in zip(sizes, prompts, outputs)
    ]
    first = 3 if with_join else len(seqs)
    batch = FamilyBatch(family, seqs[:first], family.tokenizer, {2}, pad_id=0)
    record_logits(batch, record)
    batch.prefill()
    for _ in range(3):
        batch.step()
    if with_join:
        newcomers = FamilyBatch(family, seqs[first:], family.tokenizer, {2}, pad_id=0)
        record_logits(newcomers, record)
        newcomers.prefill()
        batch.join(newcomers)
    backends |= {type(group.decode) for branches in batch.groups for group in branches}
    while not batch.done:
        batch.step()
    return outputs, [torch.stack(record[id(seq)]) for seq in seqs], backends


@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("with_join", [False, True])
def test_native_and_torch_backends_agree_on_a_llama_pair(llama_pair, with_join, weights):
    native = load_family(*llama_pair, device="cpu", weights=weights)
    stock = load_family(*llama_pair, device="cpu", native_kernels=False, weights=weights)
    native_tokens, native_logits, native_backends = _run(native, with_join)
    stock_tokens, stock_logits, stock_backends = _run(stock, with_join)
    assert native_backends == {NativeStep} and stock_backends == {LayerStep}
    assert native_tokens == stock_tokens
    for ours, theirs in zip(native_logits, stock_logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", ["even", "odd"])
@pytest.mark.parametrize(("model_type", "extra"), [("llama", {}), ("qwen3", {}), ("llama", {"attention_bias": True})])
@pytest.mark.parametrize("threads", [1, 2, 3])
@torch.inference_mode()
def test_a_prompt_in_the_kernel_matches_the_layers_forward(model_type, extra, shape, threads):
    """Left-padded prompts through the kernel in two calls (the second continuing after the first's KV), against
    the same positions through the layers' own forward: hidden states and every key and value."""
    model = _model(model_type, shape, **extra)
    layers = list(model.model.layers)
    native, stock = native_step(layers, model.config), LayerStep(layers, "self_attn")
    assert native is not None
    rows = [[5, 9, 14, 2, 7, 31, 8, 60, 3], [3, 4], [11, 12, 13, 60, 1]]
    longest = max(map(len, rows))
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows])  # [B, longest]
    filled = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])  # [B, longest]
    positions = (filled.cumsum(-1) - 1).clamp(min=0)  # [B, longest]
    cos, sin = rotary_lookup(model.model.rotary_emb)(positions.flatten())  # [B * longest, head_dim] each
    cos, sin = (part.view(len(rows), longest, -1) for part in (cos, sin))  # [B, longest, head_dim]
    hidden = model.model.embed_tokens(ids)  # [B, longest, hidden_size]
    capacity = longest + 4
    buffers = {
        name: [hidden.new_zeros(len(rows), model.config.num_key_value_heads, capacity, model.config.head_dim)
               for _ in range(2 * len(layers))]
        for name in ("native", "stock")
    }
    want = stock.run(hidden, buffers["stock"][::2], buffers["stock"][1::2], 0, filled, positions, (cos, sin))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split = 4  # the second call attends the first's positions from the cache
        parts = [slice(0, split), slice(split, longest)]
        got = torch.cat([
            native.run(hidden[:, part], buffers["native"][::2], buffers["native"][1::2], part.start,
                       filled[:, : part.stop], positions[:, part], (cos[:, part], sin[:, part]))
            for part in parts
        ], dim=1)  # [B, longest, hidden_size]
    finally:
        torch.set_num_threads(before)
    real = filled.bool()  # left padding's own hidden states are never read
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(buffers["native"], buffers["stock"]):
        torch.testing.assert_close(ours[:, :, :longest] * filled[:, None, :, None],
                                   theirs[:, :, :longest] * filled[:, None, :, None], rtol=1e-4, atol=1e-5)
