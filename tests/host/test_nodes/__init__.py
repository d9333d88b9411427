"""Test-only nodes the host tests load beside the pack (never shipped): what a real graph gets from
files we cannot have here, such as a text encoder's CONDITIONING for the tiny Wan / SD1.5 models."""

import torch


class FastGenTestConditioning:
    """Random text-encoder-shaped CONDITIONING: [[tensor[1, tokens, width], {"pooled_output": None}]]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, seed, tokens, width):
        context = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))
        return ([[context, {"pooled_output": None}]],)


NODE_CLASS_MAPPINGS = {"FastGenTestConditioning": FastGenTestConditioning}
