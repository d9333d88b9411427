"""ComfyUI nodes: thin adapters over fastgen_core, one module per capability."""

from .cache import FastGenCache, FastGenCalibrateCache
from .conditioning import FastGenDigitConditioning
from .distill import FastGenDistillDMD
from .hub import FastGenHubDownload
from .loaders import FastGenLoadModel
from .quant import FastGenLoadQuantizedModel, FastGenQuantizeModel, FastGenSaveQuantizedModel
from .sampling import FastGenSampler, FastGenSigmas
from .students import FastGenLoadStudent, FastGenLoadStudentLoRA, FastGenStudentSampler
from .tiny_vae import FastGenLoadTinyVideoDecoder, FastGenTinyVideoDecode
from .world import FastGenCausalVideoSampler
from .world_session import FastGenWorldSession

NODES = [
    FastGenLoadModel, FastGenLoadStudent, FastGenLoadStudentLoRA, FastGenDigitConditioning,
    FastGenSampler, FastGenSigmas, FastGenStudentSampler, FastGenDistillDMD,
    FastGenCausalVideoSampler, FastGenHubDownload, FastGenWorldSession, FastGenQuantizeModel, FastGenSaveQuantizedModel,
    FastGenLoadQuantizedModel, FastGenCache, FastGenCalibrateCache, FastGenLoadTinyVideoDecoder, FastGenTinyVideoDecode,
]
