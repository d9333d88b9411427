"""ComfyUI nodes: thin adapters over fastgen_core, one module per capability."""

from .conditioning import FastGenDigitConditioning
from .loaders import FastGenLoadModel

NODES = [FastGenLoadModel, FastGenDigitConditioning]
