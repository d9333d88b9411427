"""ComfyUI nodes: thin adapters over fastgen_core, one module per capability."""

from .cache import FastGenCache, FastGenCalibrateCache
from .conditioning import FastGenDigitConditioning
from .distill import FastGenDistillDMD
from .hub import FastGenHubDownload
from .loaders import FastGenLoadModel
from .sampling import FastGenSampler, FastGenSigmas
from .students import FastGenLoadStudent, FastGenLoadStudentLoRA, FastGenStudentSampler
from .world import FastGenCausalVideoSampler

NODES = [
    FastGenLoadModel, FastGenLoadStudent, FastGenLoadStudentLoRA, FastGenDigitConditioning,
    FastGenSampler, FastGenSigmas, FastGenStudentSampler, FastGenDistillDMD,
    FastGenCausalVideoSampler, FastGenHubDownload, FastGenCache, FastGenCalibrateCache,
]
