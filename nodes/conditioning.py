"""FastGen Digit Conditioning: which digits the embedded image model draws."""

from __future__ import annotations

from comfy_api.latest import io

from ..fastgen_core.networks import NULL_CLASS, class_conditioning

UNCONDITIONAL = "_"


def parse_digits(text: str) -> list[int]:
    """"0123456789" -> [0..9]; "_" is unconditional; spaces and commas are ignored."""
    labels = []
    for ch in text:
        if ch in " ,\t\n":
            continue
        if ch == UNCONDITIONAL:
            labels.append(NULL_CLASS)
        elif ch.isdigit() and ch.isascii():
            labels.append(int(ch))
        else:
            raise ValueError(f"digits: {ch!r} in {text!r} is not a digit 0-9 or '{UNCONDITIONAL}' (unconditional)")
    if not labels:
        raise ValueError(f"digits: {text!r} names no digit; write e.g. '7' or '0123456789', or '{UNCONDITIONAL}' for unconditional")
    return labels


class FastGenDigitConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenDigitConditioning",
            display_name="FastGen Digit Conditioning",
            category="FastGen/conditioning",
            description="Conditioning for the embedded digit models. One character per image of the batch, repeated "
            "to the batch size: '0123456789' with batch 10 draws each digit once.",
            inputs=[
                io.String.Input(
                    "digits",
                    default="0123456789",
                    tooltip=f"Digits 0-9, one per image, repeated to fill the batch; '{UNCONDITIONAL}' draws any digit.",
                ),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive", tooltip="The requested digits."),
                io.Conditioning.Output("negative", display_name="negative",
                                       tooltip="The unconditional class, for classifier-free guidance (cfg > 1)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, digits: str):
        try:
            parse_digits(digits)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, digits: str) -> io.NodeOutput:
        labels = parse_digits(digits)
        positive = [[class_conditioning(labels), {}]]
        negative = [[class_conditioning([NULL_CLASS] * len(labels)), {}]]
        return io.NodeOutput(positive, negative)
