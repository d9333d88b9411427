"""Student / teacher recipe: how a model must be sampled.

Stored as the JSON string `fastgen.recipe` in the metadata of every safetensors file we write
(safetensors metadata values must be strings), and read with `safe_open(...).metadata()` without
loading any tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace

from .files import atomic_path
from .sampling import NUM_TRAIN_TIMESTEPS

RECIPE_KEY = "fastgen.recipe"
SIDECAR_SUFFIX = ".recipe.json"  # `<file>.recipe.json`: the recipe of a file that must stay byte-identical (Hub downloads)
RECIPE_VERSION = 1
PREDICTIONS = ("flow", "eps", "v")
MAX_STEPS = 1000  # a recipe's step count: the training schedule's length, far above any sampler's use


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Recipe:
    family: str  # model family, e.g. "fastgen-digits", "sdxl", "wan2.1"
    prediction: str  # "flow" (CONST, x = s*noise + (1-s)*x0), "eps" or "v"
    steps: int
    sampler: str = "euler"
    cfg: float = 1.0
    shift: float | None = 1.0  # flow shift; None: the model's own (e.g. FLUX's resolution-dependent shift)
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
        # recipes come from files (metadata, sidecars): every value is checked for type and range
        # here, so a sampler never meets a string step count, NaN cfg or a billion steps
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"recipe prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        for name in ("family", "sampler", "method"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"recipe {name} must be a string, got {getattr(self, name)!r}")
        for name in ("scheduler", "teacher", "source"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"recipe {name} must be a string, got {getattr(self, name)!r}")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"recipe steps must be an integer in 1..{MAX_STEPS}, got {self.steps!r}")
        for name in ("cfg", "shift", "gamma", "lora_strength"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ValueError(f"recipe {name} must be a finite number, got {value!r}")
        if self.cfg < 0 or (self.shift is not None and self.shift <= 0):
            raise ValueError(f"recipe cfg must be >= 0 and shift > 0, got cfg={self.cfg} shift={self.shift}")
        if self.gamma is not None and not 0 <= self.gamma <= 1:
            raise ValueError(f"recipe gamma must be in [0, 1], got {self.gamma}")
        for name, top in (("timesteps", NUM_TRAIN_TIMESTEPS), ("sigmas", math.inf)):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, list) or not all(_is_number(v) and 0 <= v <= top for v in values):
                raise ValueError(f"recipe {name} must be a list of finite numbers in [0, {top:g}], got {values!r:.200}")
            if len(values) != self.steps:
                raise ValueError(f"recipe has {len(values)} {name} for {self.steps} steps")
        if not isinstance(self.extra, dict):
            raise ValueError(f"recipe extra must be an object, got {self.extra!r:.200}")

    def multistep_noise(self, default: str = "sde") -> str:
        """How a multistep recipe re-noises between steps ("sde": fresh noise, "ode": the
        prediction's own), as `world.rollout` / `sampling.sample_multistep` take it; `default`
        for recipes of other samplers."""
        return self.sampler.removeprefix("multistep_") if self.sampler.startswith("multistep_") else default

    def to_json(self) -> str:
        # shift is kept when None: null means "the model's own shift", an absent key the default 1
        values = {k: v for k, v in asdict(self).items() if (v is not None or k == "shift") and v != {}}
        return json.dumps(values, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "recipe") -> Recipe:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: '{RECIPE_KEY}' is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{source}: '{RECIPE_KEY}' must be a JSON object")
        # Keys a newer writer added are kept in `extra` rather than rejected.
        extra = values.pop("extra", None) or {}
        try:
            if not isinstance(extra, dict):
                raise ValueError(f"recipe extra must be an object, got {extra!r:.200}")
            extra = {**extra, **{k: values.pop(k) for k in list(values) if k not in cls.__dataclass_fields__}}
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


def families_compatible(student_family: str, family: str | None) -> bool:
    if family is None:
        return True
    if student_family.startswith("wan") and family.startswith("wan"):
        return True  # Wan 2.1 students (lightx2v, CausVid LoRAs) also serve Wan 2.2
    return student_family == family


def identify_student(filename: str, keys=(), family: str | None = None, kind: str | None = None) -> KnownStudent | None:
    """The known student a file is, from its name first and then its keys; None when unknown."""
    name = filename.lower()
    candidates = [s for s in KNOWN_STUDENTS if (kind is None or s.kind == kind) and families_compatible(s.recipe.family, family)]
    for student in candidates:
        match = re.search(student.file_pattern, name) if student.file_pattern else None
        if match:
            steps = match.groupdict().get("steps")
            return replace(student, recipe=replace(student.recipe, steps=int(steps))) if steps else student
    keys = list(keys)
    for student in candidates:
        if student.key_rule and family is not None:
            fragment, present = student.key_rule
            if any(fragment in k for k in keys) == present:
                return student
    return None


# Recipes as the students' authors document them (source: the model card or the authors' code).
# ComfyUI names stand in for diffusers ones: LCMScheduler -> multistep_sde (predict x0, re-noise
# with fresh noise), DDIM "trailing" -> ddim + sgm_uniform, Euler "trailing" -> euler + sgm_uniform.
# A `(?P<steps>N)` group in file_pattern sets the step count from the file name.
_DMD2 = "https://huggingface.co/tianweiy/DMD2"
_LIGHTNING = "https://huggingface.co/ByteDance/SDXL-Lightning"
_HYPER = "https://huggingface.co/ByteDance/Hyper-SD"
_LIGHTX2V = "https://lightx2v-en.readthedocs.io/en/latest/method_tutorials/step_distill.html"

KNOWN_STUDENTS: tuple[KnownStudent, ...] = (
    KnownStudent(
        "lightx2v Wan 2.1 step + CFG distill LoRA", "lora",
        Recipe(family="wan2.1", prediction="flow", steps=4, timesteps=[1000, 750, 500, 250], shift=5.0, cfg=1.0,
               sampler="multistep_sde", method="dmd", source=_LIGHTX2V),
        file_pattern=r"lightx2v.*(step|cfg).*distill|stepdistill.*cfgdistill",
    ),
    KnownStudent(
        # Kijai's LoRA of lightx2v's 14B CausVid: cfg 1, at least 4 steps, reduced strength (his issue #576);
        # the 9 timesteps of LightX2V's 14B CausVid config used directly as sigmas, as his flowmatch_causvid does
        "CausVid Wan 2.1 LoRA (Kijai)", "lora",
        Recipe(family="wan2.1", prediction="flow", steps=9, timesteps=[999, 934, 862, 756, 603, 410, 250, 140, 74], shift=1.0,
               cfg=1.0, sampler="multistep_sde", method="dmd (causvid)",
               source="https://github.com/kijai/ComfyUI-WanVideoWrapper/issues/576"),
        file_pattern=r"causvid",
    ),
    KnownStudent(
        "DMD2 SDXL 4-step", "model",
        Recipe(family="sdxl", prediction="eps", steps=4, timesteps=[999, 749, 499, 249], cfg=1.0, sampler="multistep_sde",
               method="dmd2", source=_DMD2),
        file_pattern=r"dmd2.*sdxl.*4.?step",
    ),
    KnownStudent(
        "DMD2 SDXL 4-step LoRA", "lora",
        Recipe(family="sdxl", prediction="eps", steps=4, timesteps=[999, 749, 499, 249], cfg=1.0, sampler="multistep_sde",
               method="dmd2", source=_DMD2),
        file_pattern=r"dmd2.*sdxl.*4.?step",
    ),
    KnownStudent(
        "SDXL-Lightning", "model",
        Recipe(family="sdxl", prediction="eps", steps=4, scheduler="sgm_uniform", cfg=1.0, sampler="euler",
               method="progressive adversarial distillation", source=_LIGHTNING),
        file_pattern=r"sdxl_lightning_(?P<steps>[248])step_unet",
    ),
    KnownStudent(
        "SDXL-Lightning LoRA", "lora",
        Recipe(family="sdxl", prediction="eps", steps=4, scheduler="sgm_uniform", cfg=1.0, sampler="euler",
               method="progressive adversarial distillation", source=_LIGHTNING),
        file_pattern=r"sdxl_lightning_(?P<steps>[248])step_lora",
    ),
    KnownStudent(
        # the "unified" 1-step LoRA serves 1 to 8 steps with TCD at eta (gamma) 1; lower gamma for more detail
        "Hyper-SD 1-step unified LoRA (SDXL)", "lora",
        Recipe(family="sdxl", prediction="eps", steps=1, scheduler="simple", cfg=1.0, sampler="tcd", gamma=1.0,
               method="hyper-sd", source=_HYPER),
        file_pattern=r"hyper-sdxl-1step-lora",
    ),
    KnownStudent(
        "Hyper-SD 1-step unified LoRA (SD1.5)", "lora",
        Recipe(family="sd15", prediction="eps", steps=1, scheduler="simple", cfg=1.0, sampler="tcd", gamma=1.0,
               method="hyper-sd", source=_HYPER),
        file_pattern=r"hyper-sd15-1step-lora",
    ),
    KnownStudent(
        "Hyper-SDXL CFG-preserving LoRA", "lora",
        Recipe(family="sdxl", prediction="eps", steps=8, scheduler="simple", cfg=5.0, sampler="ddim",
               method="hyper-sd", source=_HYPER),
        file_pattern=r"hyper-sdxl-(?P<steps>\d+)steps?-cfg-lora",
    ),
    KnownStudent(
        "Hyper-SDXL LoRA", "lora",
        Recipe(family="sdxl", prediction="eps", steps=8, scheduler="simple", cfg=1.0, sampler="ddim",
               method="hyper-sd", source=_HYPER),
        file_pattern=r"hyper-sdxl-(?P<steps>\d+)steps?-lora",
    ),
    KnownStudent(
        "Hyper-SD1.5 LoRA", "lora",
        Recipe(family="sd15", prediction="eps", steps=8, scheduler="simple", cfg=1.0, sampler="ddim",
               method="hyper-sd", source=_HYPER),
        file_pattern=r"hyper-sd15-(?P<steps>\d+)steps?-lora",
    ),
    KnownStudent(
        "Hyper-FLUX.1-dev LoRA", "lora",
        Recipe(family="flux", prediction="flow", steps=8, scheduler="simple", cfg=1.0, shift=None, sampler="euler",
               lora_strength=0.125, method="hyper-sd", source=_HYPER, extra={"flux_guidance": 3.5}),
        file_pattern=r"hyper-flux.*-(?P<steps>\d+)steps?-lora",
    ),
    KnownStudent(
        "TCD SDXL LoRA", "lora",
        Recipe(family="sdxl", prediction="eps", steps=4, cfg=1.0, sampler="tcd", gamma=0.3, scheduler="sgm_uniform",
               method="tcd", source="https://huggingface.co/h1t/TCD-SDXL-LoRA"),
        file_pattern=r"tcd.*sdxl|sdxl.*tcd",
    ),
    KnownStudent(
        # the card's FlowMatchEuler config (dynamic shifting with base = max = log 3) is a fixed shift of 3
        "Qwen-Image-Lightning LoRA", "lora",
        Recipe(family="qwen-image", prediction="flow", steps=8, scheduler="simple", cfg=1.0, shift=3.0, sampler="euler",
               method="lightning", source="https://huggingface.co/lightx2v/Qwen-Image-Lightning"),
        file_pattern=r"qwen-image-lightning-(?P<steps>\d+)steps",
    ),
    KnownStudent(
        "FLUX.1 schnell", "model",
        Recipe(family="flux", prediction="flow", steps=4, scheduler="simple", cfg=1.0, shift=None, sampler="euler",
               method="latent adversarial diffusion distillation", source="https://huggingface.co/black-forest-labs/FLUX.1-schnell"),
        file_pattern=r"flux.*schnell",
        key_rule=("guidance_in.", False),  # FLUX without the guidance embedder is schnell
    ),
)


# ------------------------------------------------------------------ sidecar recipes and the lookup order


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def read_sidecar(path: str) -> dict | None:
    """The sidecar of a student file as a dict, or None when there is none. Its "recipe" (a Recipe as a
    JSON object) is absent for a downloaded file with no known recipe, which keeps only provenance."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{side}: not a readable recipe sidecar ({err}); delete it or download the file again") from None
    if not isinstance(values, dict) or not isinstance(values.get("recipe", {}), dict):
        raise ValueError(f"{side}: a recipe sidecar must be a JSON object whose 'recipe' is an object")
    return values


def write_sidecar(path: str, recipe: Recipe | None, **provenance) -> str:
    """Write `<path>.recipe.json` atomically: the recipe plus where the file came from (repo, revision,
    sha256, size...). Values must be JSON-serialisable."""
    side = sidecar_path(path)
    values = {"recipe": json.loads(recipe.to_json()) if recipe is not None else None, **provenance}
    if recipe is None:
        values.pop("recipe")
    with atomic_path(side) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=1, sort_keys=True)
    return side


def lookup_recipe(path: str, metadata: dict, keys=(), family: str | None = None, kind: str | None = None) -> tuple[Recipe | None, str]:
    """The recipe of a student file and where it came from, in this order: the file's own `fastgen.recipe`
    metadata (what the maker wrote), the `<file>.recipe.json` sidecar (what a download recorded), the
    known-students table (recognised by name or keys). (None, "") when none applies."""
    if RECIPE_KEY in metadata:
        return Recipe.from_json(metadata[RECIPE_KEY], source=path), f"from the file's {RECIPE_KEY} metadata"
    side = read_sidecar(path)
    if side is not None and side.get("recipe") is not None:
        recipe = Recipe.from_json(json.dumps(side["recipe"]), source=sidecar_path(path))
        origin = f" ({side['repo_id']})" if side.get("repo_id") else ""
        return recipe, f"from its sidecar {os.path.basename(sidecar_path(path))}{origin} (recipe from {recipe.source})"
    known = identify_student(os.path.basename(path), keys=keys, family=family, kind=kind)
    if known is not None:
        return known.recipe, f"recognised as {known.name} (recipe from {known.recipe.source})"
    return None, ""
