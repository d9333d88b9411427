"""ComfyUI nodes: thin adapters over fastgen_core, one module per capability."""

from .conditioning import FastGenDigitConditioning
from .loaders import FastGenLoadModel
from .sampling import FastGenSampler, FastGenSigmas

NODES = [FastGenLoadModel, FastGenDigitConditioning, FastGenSampler, FastGenSigmas]
