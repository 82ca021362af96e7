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
def _drop_missing_parts():
    """A ProcessorMixin step in the MRO, between HF's processor and ProcessorMixin, that drops the absent
    video processor from the parts HF's `__init__` passes on positionally (LLaVA-NeXT-Video passes it
    first: without this, the image processor would land in the tokenizer's slot)."""
    from transformers import ProcessorMixin

    class DropMissingParts(ProcessorMixin):
        def __init__(self, *args, **kwargs):
            super().__init__(*[a for a in args if a is not None], **kwargs)

    return DropMissingParts


@lru_cache(maxsize=None)
def image_only_processor_class(name: str):
    """The transformers processor class `name` without its video processor."""
    import transformers

    base = getattr(transformers, name)

    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        # the loaded parts by keyword: HF's signatures put the video processor first or last
        parts = dict(zip(cls.get_attributes(), args))
        return base.from_args_and_dict.__func__(cls, [], processor_dict, **parts, **kwargs)

    return type(
        name,
        (base, _drop_missing_parts()),
        {
            "__module__": __name__,
            "__doc__": f"{name} for images only (no video processor, so no torchvision needed).",
            "from_args_and_dict": classmethod(from_args_and_dict),
            "get_attributes": classmethod(lambda cls: ["image_processor", "tokenizer"]),
        },
    )
