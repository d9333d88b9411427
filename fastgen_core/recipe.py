"""Student / teacher recipe: how a model must be sampled.

Stored as the JSON string `fastgen.recipe` in the metadata of every safetensors file we write
(safetensors metadata values must be strings), and read with `safe_open(...).metadata()` without
loading any tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

RECIPE_KEY = "fastgen.recipe"
RECIPE_VERSION = 1
PREDICTIONS = ("flow", "eps", "v")


@dataclass(frozen=True)
class Recipe:
    family: str  # model family, e.g. "fastgen-digits", "sdxl", "wan2.1"
    prediction: str  # "flow" (CONST, x = s*noise + (1-s)*x0), "eps" or "v"
    steps: int
    sampler: str = "euler"
    cfg: float = 1.0
    shift: float = 1.0
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    scheduler: str | None = None  # the host scheduler that spaces `steps` when no timesteps/sigmas are given
    gamma: float | None = None  # TCD's share of fresh noise per step
    lora_strength: float | None = None  # for LoRA students whose authors document a strength other than 1
    method: str = "teacher"  # "teacher", "dmd2", "lcm", ...
    teacher: str | None = None
    source: str | None = None  # where the recipe comes from (model card URL for public students)
    version: int = RECIPE_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"recipe prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"recipe steps must be a positive integer, got {self.steps!r}")
        if self.cfg < 0 or self.shift <= 0:
            raise ValueError(f"recipe cfg must be >= 0 and shift > 0, got cfg={self.cfg} shift={self.shift}")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"recipe gamma must be in [0, 1], got {self.gamma}")
        for name in ("timesteps", "sigmas"):
            values = getattr(self, name)
            if values is not None and len(values) != self.steps:
                raise ValueError(f"recipe has {len(values)} {name} for {self.steps} steps")

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None and v != {}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: '{RECIPE_KEY}' is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{source}: '{RECIPE_KEY}' must be a JSON object")
        # Keys a newer writer added are kept in `extra` rather than rejected.
        extra = dict(values.pop("extra", None) or {})
        extra.update({k: values.pop(k) for k in list(values) if k not in cls.__dataclass_fields__})
        try:
            return cls(**values, extra=extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: bad '{RECIPE_KEY}' ({err})") from None


# ------------------------------------------------------------------ known public students


@dataclass(frozen=True)
class KnownStudent:
    """A public distilled student and the recipe its authors document (`recipe.source`).

    Identified by file name (`file_pattern`, a regex over the lower-cased name, as the authors or the
    usual ComfyUI re-uploads distribute it) or, for full models, by a weight key that must be
    present or absent (`key_rule`: FLUX schnell is FLUX without the guidance embedder).
    """

    name: str
    kind: str  # "model" (full UNet / transformer) or "lora"
    recipe: Recipe
    file_pattern: str | None = None
    key_rule: tuple[str, bool] | None = None


def _families_compatible(student_family: str, family: str | None) -> bool:
    if family is None:
        return True
    if student_family.startswith("wan") and family.startswith("wan"):
        return True  # Wan 2.1 students (lightx2v, CausVid LoRAs) also serve Wan 2.2
    return student_family == family


def identify_student(filename: str, keys=(), family: str | None = None, kind: str | None = None) -> KnownStudent | None:
    """The known student a file is, from its name first and then its keys; None when unknown."""
    name = filename.lower()
    candidates = [s for s in KNOWN_STUDENTS if (kind is None or s.kind == kind) and _families_compatible(s.recipe.family, family)]
    for student in candidates:
        if student.file_pattern and re.search(student.file_pattern, name):
            return student
    keys = list(keys)
    for student in candidates:
        if student.key_rule and family is not None:
            fragment, present = student.key_rule
            if any(fragment in k for k in keys) == present:
                return student
    return None


KNOWN_STUDENTS: tuple[KnownStudent, ...] = (
    KnownStudent(
        "lightx2v Wan 2.1 T2V 14B step + CFG distill LoRA", "lora",
        Recipe(family="wan2.1", prediction="flow", steps=4, timesteps=[1000, 750, 500, 250], shift=5.0, cfg=1.0,
               sampler="multistep_sde", method="dmd", source="https://huggingface.co/lightx2v/Wan2.1-T2V-14B-StepDistill-CfgDistill"),
        file_pattern=r"lightx2v.*(step|cfg).*distill|stepdistill",
    ),
)
