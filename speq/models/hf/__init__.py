"""Hugging Face model families speq runs: each maps a transformers config and its tensors onto
speq's model (speq.models.hf.family.Family). `FAMILIES` is the registry; `family_of` finds one by
``model_type`` or class name, with an error that lists the supported ones."""

from __future__ import annotations

from speq.models.hf.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from speq.models.hf.family import Family
from speq.models.hf.gpt_oss import GPT_OSS
from speq.models.hf.mixtral import MIXTRAL
from speq.models.hf.olmoe import OLMOE
from speq.models.hf.phimoe import PHIMOE
from speq.models.hf.qwen_moe import QWEN2_MOE, QWEN3_MOE

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, PHIMOE, GPT_OSS)
}


def supported() -> str:
    """The supported transformers classes, for error messages."""
    return ", ".join(c for f in FAMILIES.values() for c in f.classes)


def family_of(model_type: object, class_name: str | None = None) -> Family:
    """The family of a ``model_type`` (config.json) or transformers class name; a ValueError that
    names it and lists the supported classes otherwise."""
    for f in FAMILIES.values():
        if model_type in f.model_types or class_name in f.classes:
            return f
    what = class_name or f"model_type {model_type!r}"
    raise ValueError(f"speq does not support {what}; supported: {supported()}")


__all__ = ["FAMILIES", "Family", "family_of", "supported"]
