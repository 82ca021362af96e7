"""Processors that work with and without torchvision.

Processors that own a video processor (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) crash on
construction without torchvision, and `AutoProcessor.from_pretrained` then silently returns only
the tokenizer. sightline feeds images only, so `image_only_processor_class(name)` gives HF's class
declaring just (image_processor, tokenizer): construction and `from_pretrained` work either way,
images are processed exactly as by the parent, and the subclass keeps HF's class name, so a folder
it saves is an ordinary checkpoint of that processor.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def image_only_processor_class(name: str):
    """The transformers processor class `name` without its video processor."""
    import transformers

    base = getattr(transformers, name)
    return type(
        name,
        (base,),
        {
            "__module__": __name__,
            "__doc__": f"{name} for images only (no video processor, so no torchvision needed).",
            "get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"]),
        },
    )
