"""models_store pairs: manifests, sha256 checks, the packed int8 student and its unpacking."""

import json
import shutil

import pytest
import torch

from services.errors import IntegrityError, InvalidPairError
from services.family import load_family
from services.store.integrity import hash_weights
from services.store.student_pack import PACK_INFO, PACKED_WEIGHTS, pack_student, quantize_rows

TOKENS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def make_store_pair(pair, root, packed: bool):
    teacher_dir, student_dir = pair
    pair_dir = root / "pair"
    shutil.copytree(teacher_dir, pair_dir / "teacher")
    if packed:
        pack_student(student_dir, teacher_dir, pair_dir / "student")
    else:
        shutil.copytree(student_dir, pair_dir / "student")
    manifest = {"name": "tiny", "order": "last", "dtype": "float32",
                "teacher": {"source": "path", "path": "teacher", "sha256": hash_weights(pair_dir / "teacher")},
                "student": {"path": "student", "sha256": hash_weights(pair_dir / "student"),
                            **({"format": "boomerang-int8-v1"} if packed else {})}}
    (pair_dir / "manifest.json").write_text(json.dumps(manifest))
    return pair_dir


def test_pair_folder_loads_and_matches_the_two_folder_form(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    pair_dir = make_store_pair(llama_pair, tmp_path, packed=False)
    from_store = load_family(pair=pair_dir, device="cpu")
    direct = load_family(*llama_pair, device="cpu")
    assert from_store.name == "tiny" and from_store.sizes == direct.sizes
    for n in from_store.sizes:
        torch.testing.assert_close(from_store.variant(n)(TOKENS).logits, direct.variant(n)(TOKENS).logits)


def test_sha256_mismatch_is_refused(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    pair_dir = make_store_pair(llama_pair, tmp_path, packed=False)
    weights = pair_dir / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        load_family(pair=pair_dir, device="cpu")


def test_packed_student_is_int8_shares_nothing_duplicated_and_stays_close(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    pair_dir = make_store_pair(llama_pair, tmp_path, packed=True)
    info = json.loads((pair_dir / "student" / PACK_INFO).read_text())
    assert "model.layers.0.self_attn.q_proj.weight" in info["quantized"]
    packed_bytes = (pair_dir / "student" / PACKED_WEIGHTS).stat().st_size
    assert packed_bytes < 0.3 * (llama_pair[1] / "model.safetensors").stat().st_size
    family = load_family(pair=pair_dir, device="cpu")
    reference = load_family(*llama_pair, device="cpu")
    student = family.variant(min(family.sizes))(TOKENS).logits
    expected = reference.variant(min(family.sizes))(TOKENS).logits
    torch.testing.assert_close(student, expected, rtol=0.05, atol=0.05)
    again = load_family(pair=pair_dir, device="cpu")  # reuses the unpacked cache
    torch.testing.assert_close(again.variant(min(family.sizes))(TOKENS).logits, student, rtol=0, atol=0)


def test_quantize_rows_error_is_bounded():
    weight = torch.randn(16, 64)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8
    assert (q.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-6


def test_update_manifest_changes_only_what_it_is_told_and_leaves_no_temporary_file(tmp_path):
    from services.errors import InvalidPairError
    from services.store import update_manifest

    (tmp_path / "manifest.json").write_text(json.dumps({"name": "p", "quality": {"16": {"chat": 1}}}))
    update_manifest(tmp_path, lambda m: m["quality"].setdefault("17", {}).update(perplexity=2))
    assert json.loads((tmp_path / "manifest.json").read_text()) == {
        "name": "p", "quality": {"16": {"chat": 1}, "17": {"perplexity": 2}}}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidPairError, match="not valid JSON"):
        update_manifest(tmp_path, lambda m: None)


def test_a_student_near_its_teacher_packs_as_deltas_and_keeps_steps_smaller_than_int8_rounding(llama_pair, tmp_path):
    """A fine-tuning step far below the int8 rounding of the whole weight must survive packing."""
    from safetensors.torch import load_file, save_file

    from services.store.student_pack import read_weights, teacher_origin, unpack_student

    teacher_dir, student_dir = llama_pair
    kept = json.loads((student_dir / "student_config.json").read_text())["copied_teacher_layers"]
    teacher = read_weights(teacher_dir)
    tuned = tmp_path / "tuned"
    shutil.copytree(student_dir, tuned)
    weights = load_file(tuned / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    origin = teacher[teacher_origin(name, kept)]  # [out, in]
    step = 1e-3 * origin.abs().amax(dim=1, keepdim=True) / 127 * torch.randn_like(origin)  # far below rounding
    weights[name] = origin + step
    save_file(weights, tuned / "model.safetensors")
    info = pack_student(tuned, teacher_dir, tmp_path / "packed")
    assert info["format"] == "boomerang-int8-v2"
    assert info["delta_from"][name] == f"model.layers.{kept[1]}.mlp.up_proj.weight"
    unpacked = load_file(unpack_student(tmp_path / "packed", teacher_dir, tmp_path / "unpacked") / "model.safetensors")
    error = (unpacked[name] - weights[name]).abs().max()
    assert error < 0.01 * step.abs().max()  # whole-weight int8 errs by up to half a rounding step: 500x the step


def test_sampling_defaults_reach_the_family_and_bad_ones_are_refused(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    pair_dir = make_store_pair(llama_pair, tmp_path, packed=False)
    path = pair_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    defaults = {"repetition_penalty": 1.1, "presence_penalty": -2, "frequency_penalty": 2}
    path.write_text(json.dumps({**manifest, "sampling_defaults": defaults}))
    assert load_family(pair=pair_dir, device="cpu").sampling_defaults == defaults
    for bad, message in (({"temperature": 0.5}, "is not one of"), ({"repetition_penalty": 0}, "must be a number"),
                         ({"presence_penalty": 2.5}, "must be a number"),
                         ({"repetition_penalty": "high"}, "must be a number")):
        path.write_text(json.dumps({**manifest, "sampling_defaults": bad}))
        with pytest.raises(InvalidPairError, match=message):
            load_family(pair=pair_dir, device="cpu")
