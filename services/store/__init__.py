"""The model store: `models_store/<pair>/manifest.json`, sha256 checks, packed students and imported teachers."""

from services.store.manifest import (
    DEFAULT_PAIR,
    MANIFEST,
    STORE_DIR,
    Manifest,
    cache_dir,
    resolve_student,
    resolve_teacher,
    update_manifest,
)

__all__ = ["DEFAULT_PAIR", "MANIFEST", "STORE_DIR", "Manifest", "cache_dir", "resolve_student", "resolve_teacher",
           "update_manifest"]
