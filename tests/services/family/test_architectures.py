"""Every architecture in the table assembles variants equal to the deep-copied reference (tiny random pairs)."""

import pytest
import torch

from services.errors import UnsupportedArchitectureError
from services.family import load_family
from services.family.architectures import ARCHITECTURES, spec_for
from services.family.reference import build_reference
from tests.conftest import make_pair
from tests.services.family.test_family import TOKENS, load_standalone


@pytest.mark.parametrize("model_type", sorted(set(ARCHITECTURES) - {"llama", "qwen3"}))
def test_other_architectures_match_the_reference(model_type, tmp_path):
    teacher_dir, student_dir = make_pair(tmp_path, model_type)
    teacher, student = load_standalone(teacher_dir), load_standalone(student_dir)
    for order in ("last", "first"):
        family = load_family(teacher_dir, student_dir, order=order, device="cpu")
        copied = list(family.layout.copied_teacher_layers)
        for n in family.sizes:
            reference = build_reference(teacher, student, copied, family.plan(n).patched_blocks, order)
            with torch.no_grad():
                torch.testing.assert_close(family.variant(n)(TOKENS).logits, reference(TOKENS, use_cache=False).logits)
        model = family.variant(family.sizes[1])
        out = model.generate(TOKENS, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape[1] == TOKENS.shape[1] + 3


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox, llama, mistral, qwen2, qwen3"):
        spec_for("bert")
