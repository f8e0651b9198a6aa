"""The family core: layer plans, variant assembly, KV cache pieces and loading a teacher/student pair.

    from services.family import load_family
    family = load_family(teacher="teacher_dir", student="student_dir", order="last")
    model = family.variant(family.sizes[3])      # behaves like a transformers causal LM
"""

from services.family.family import Family, load_family

__all__ = ["Family", "load_family"]
