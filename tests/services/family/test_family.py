"""Numerics of shared-module variants on tiny random Llama and Qwen3 pairs, against deep-copied references."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.cpu.fast_linear import enable_fast_linear
from services.errors import IntegrityError, InvalidPairError, UnknownSizeError
from services.family import load_family
from services.family.plan import patch_sequence
from services.family.reference import build_reference

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 61, 11, 8]])


def load_standalone(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("order", ["last", "first"])
def test_every_size_matches_deep_copied_reference(tiny_pair, order):
    teacher_dir, student_dir = tiny_pair
    family = load_family(teacher_dir, student_dir, order=order, device="cpu")
    teacher, student = load_standalone(teacher_dir), load_standalone(student_dir)
    copied = list(family.layout.copied_teacher_layers)
    for n in family.sizes:
        k = family.plan(n).patched_blocks
        reference = build_reference(teacher, student, copied, k, order)
        assert reference.config.num_hidden_layers == n
        with torch.no_grad():
            expected = reference(TOKENS, use_cache=False).logits
            actual = family.variant(n)(TOKENS).logits
        torch.testing.assert_close(actual, expected)


def test_an_explicit_patch_order_matches_its_reference_and_decodes_with_the_cache(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    layout = load_family(teacher_dir, student_dir, device="cpu").layout
    multi = list(patch_sequence(layout, "first"))
    order = multi[1:] + multi[:1]  # interleaves teacher blocks between student layers
    family = load_family(teacher_dir, student_dir, order=order, device="cpu")
    teacher, student = load_standalone(teacher_dir), load_standalone(student_dir)
    for n in family.sizes[1:-1]:
        reference = build_reference(teacher, student, list(layout.copied_teacher_layers),
                                    family.plan(n).patched_blocks, order)
        with torch.no_grad():
            torch.testing.assert_close(family.variant(n)(TOKENS).logits, reference(TOKENS, use_cache=False).logits)
            expected = reference.generate(TOKENS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            actual = family.variant(n).generate(TOKENS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert actual.tolist() == expected.tolist()


def test_endpoints_are_exactly_teacher_and_student(tiny_pair):
    teacher_dir, student_dir = tiny_pair
    family = load_family(teacher_dir, student_dir, device="cpu")
    teacher, student = load_standalone(teacher_dir), load_standalone(student_dir)
    enable_fast_linear(teacher, student)  # the same kernels as the family: then bit for bit
    with torch.no_grad():
        teacher_logits = teacher(TOKENS).logits
        student_logits = student(TOKENS).logits
        torch.testing.assert_close(family.variant(max(family.sizes))(TOKENS).logits, teacher_logits,
                                   rtol=0, atol=0)
        torch.testing.assert_close(family.variant(min(family.sizes))(TOKENS).logits, student_logits,
                                   rtol=0, atol=0)


def greedy_without_cache(model, prompt, steps):
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_cached_generation_equals_recomputation(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    for n in (family.sizes[0], family.sizes[1], family.sizes[-1]):
        model = family.variant(n)
        expected = greedy_without_cache(model, TOKENS, 6)
        out = model.generate(TOKENS, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(TOKENS))
        assert torch.equal(out, expected), n


def test_two_variants_interleaved_step_by_step_keep_separate_caches(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    small, large = family.variant(family.sizes[1]), family.variant(family.sizes[2])
    expected = {m: greedy_without_cache(m, TOKENS, 5) for m in (small, large)}
    caches = {m: m.new_cache() for m in (small, large)}
    ids = {m: TOKENS for m in (small, large)}
    feed = {m: TOKENS for m in (small, large)}
    for _ in range(5):
        for model in (small, large):  # alternate: shared layer modules, separate caches
            with torch.no_grad():
                logits = model(feed[model], use_cache=True, **{_cache_arg(model): caches[model]}).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids[model] = torch.cat([ids[model], token], dim=1)
            feed[model] = token
    for model in (small, large):
        assert torch.equal(ids[model], expected[model])


def _cache_arg(model):
    from services.family.compat import cache_argument_name

    return cache_argument_name(type(model))


def test_assembling_every_size_adds_no_parameter_storage(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    owned = {p.data_ptr() for m in (family.teacher, family.student) for p in m.parameters()}
    owned_bytes = sum(p.numel() * p.element_size() for m in (family.teacher, family.student)
                      for p in {id(p): p for p in m.parameters()}.values())
    for n in family.sizes:
        variant = family.variant(n)
        for tensor in list(variant.parameters()) + list(variant.buffers()):
            assert tensor.device.type != "meta"
        assert {p.data_ptr() for p in variant.parameters()} <= owned
    assert family.size_info(max(family.sizes)).bytes <= owned_bytes
    assert sorted(family.cached_sizes()) == family.sizes


def test_lru_eviction_keeps_shared_weights(llama_pair):
    family = load_family(*llama_pair, device="cpu", cache_size=2)
    first = family.variant(family.sizes[0])(TOKENS).logits
    for n in family.sizes:
        family.variant(n)
    assert len(family.cached_sizes()) == 2
    torch.testing.assert_close(family.variant(family.sizes[0])(TOKENS).logits, first)


def test_layer_idx_is_unique_per_module_and_never_rewritten(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    before = [layer.self_attn.layer_idx for m in (family.teacher, family.student) for layer in m.model.layers]
    assert len(set(before)) == len(before)
    for n in family.sizes:
        family.variant(n)(TOKENS)
    after = [layer.self_attn.layer_idx for m in (family.teacher, family.student) for layer in m.model.layers]
    assert before == after


def test_unknown_size_is_refused(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    with pytest.raises(UnknownSizeError, match="sizes are"):
        family.variant(999)


def _copy_pair(pair, tmp_path):
    teacher_dir, student_dir = tmp_path / "t", tmp_path / "s"
    shutil.copytree(pair[0], teacher_dir)
    shutil.copytree(pair[1], student_dir)
    return teacher_dir, student_dir


def test_bad_pairs_are_refused_with_clear_messages(llama_pair, tmp_path):
    teacher_dir, student_dir = _copy_pair(llama_pair, tmp_path)
    config_path = student_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(InvalidPairError, match="hidden_size"):
        load_family(teacher_dir, student_dir, device="cpu")
    config_path.write_text(json.dumps({**config, "vocab_size": 999}))
    with pytest.raises(InvalidPairError, match="vocab_size"):
        load_family(teacher_dir, student_dir, device="cpu")
    config_path.write_text(json.dumps(config))
    (student_dir / "student_config.json").write_text(json.dumps({"copied_teacher_layers": [0, 2, 4, 6]}))
    with pytest.raises(InvalidPairError, match="copies 4"):
        load_family(teacher_dir, student_dir, device="cpu")
    with pytest.raises(InvalidPairError, match="unknown patch order"):
        load_family(*llama_pair, order="sideways", device="cpu")


def test_unsupported_architecture_and_pickle_are_refused(llama_pair, tmp_path):
    from services.errors import UnsupportedArchitectureError

    teacher_dir, student_dir = _copy_pair(llama_pair, tmp_path)
    config = json.loads((teacher_dir / "config.json").read_text())
    (teacher_dir / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(UnsupportedArchitectureError, match="supported: gpt_neox, llama"):
        load_family(teacher_dir, student_dir, device="cpu")
    (teacher_dir / "config.json").write_text(json.dumps(config))
    (student_dir / "model.safetensors").rename(student_dir / "pytorch_model.bin")
    with pytest.raises(IntegrityError, match="pickled"):
        load_family(teacher_dir, student_dir, device="cpu")


def test_variants_generate_even_when_the_student_config_disables_the_cache(llama_pair, tmp_path):
    teacher_dir, student_dir = _copy_pair(llama_pair, tmp_path)
    config = json.loads((student_dir / "config.json").read_text())
    (student_dir / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    family = load_family(teacher_dir, student_dir, device="cpu")
    student = family.variant(min(family.sizes))
    out = student.generate(TOKENS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_without_cache(student, TOKENS, 4))


def test_bit_identical_student_tensors_are_shared_with_the_teacher(llama_pair, tmp_path):
    from safetensors.torch import load_file, save_file

    teacher_dir, student_dir = _copy_pair(llama_pair, tmp_path)
    weights = load_file(student_dir / "model.safetensors")
    weights["model.embed_tokens.weight"] = load_file(teacher_dir / "model.safetensors")["model.embed_tokens.weight"]
    save_file(weights, student_dir / "model.safetensors", metadata={"format": "pt"})
    family = load_family(teacher_dir, student_dir, device="cpu")
    embed = family.student.model.embed_tokens.weight
    assert embed is family.teacher.model.embed_tokens.weight
    assert family.student.lm_head.weight is embed  # still tied
    assert family.shared_bytes == embed.numel() * 4
    reference = load_family(teacher_dir, student_dir, device="cpu")
    for n in family.sizes:
        torch.testing.assert_close(family.variant(n)(TOKENS).logits, reference.variant(n)(TOKENS).logits)


def test_a_loaded_family_keeps_no_weight_file_mapped(llama_pair):
    """Every weight gets memory of its own on CPU: a tensor left on the loaded file's pages keeps the whole
    file mapped, and every page of it that was read resident (one more copy of the pair in RSS)."""
    import gc

    family = load_family(*llama_pair, device="cpu")
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    assert family.sizes and not any(str(folder) in mapped for folder in llama_pair)
