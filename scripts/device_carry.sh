#!/usr/bin/env bash
# Prepares .device/ (git-ignored) so that the real ComfyUI plus this pack runs on a lent GPU
# machine that has Python 3.12 and a CUDA torch but no package index:
#   .device/wheels/   pinned cp312 / pure-Python wheels of what that image lacks
#   .device/comfyui/  the ComfyUI source from $COMFYUI_PATH (default ~/ComfyUI), less tests,
#                     git data, models, custom nodes and caches
#   .device/stubs/    inert stand-ins for packages too big to carry (PyAV, PuLP) and for the
#                     frontend / template / docs packages whose files a headless run never serves
# On the GPU machine, from the repo root: `source scripts/device_env.sh` (carry .device with the
# call). The working tree plus .device/ must stay under the 64 MiB a device call carries.
# Idempotent: wheels already downloaded are kept; the ComfyUI copy and the stubs are rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

COMFYUI_PATH=${COMFYUI_PATH:-$HOME/ComfyUI}
DEV=.device
MAX_DEVICE_BYTES=46000000   # .device/ beside the ~17 MB of tracked files, under 64 MiB in all
MAX_TREE_BYTES=67108864     # what a device call carries at most

if [ ! -f "$COMFYUI_PATH/main.py" ] || [ ! -d "$COMFYUI_PATH/comfy" ]; then
  echo "device_carry: COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / comfy/)" >&2
  exit 1
fi

# --- wheels -------------------------------------------------------------------------------------
# What the GPU image lacks of ComfyUI v0.3.64's requirements.txt and ours, with their own
# Requires-Dist that the image lacks too (checked with `unzip -p WHEEL '*/METADATA'`). Left out:
# av (PyAV) and pulp (a modelopt requirement), stubbed below; antlr4 (omegaconf 2.4 vendors it);
# greenlet (SQLAlchemy 2.1 no longer requires it).
WHEELS=(
  typing-extensions==4.16.0    # pydantic 2.14 needs >= 4.16; the image's may be older
  annotated-types==0.8.0
  typing-inspection==0.4.5
  pydantic-core==2.50.5        # binary, cp312
  pydantic==2.14.4             # ComfyUI: pydantic~=2.0; modelopt: >= 2.0
  python-dotenv==1.2.4
  pydantic-settings==2.16.3    # ComfyUI: ~=2.0
  mako==1.4.3
  sqlalchemy==2.1.9            # binary, cp312
  alembic==1.20.1
  kornia-rs==0.2.0             # binary, cp312
  kornia==0.9.0                # ours and ComfyUI: >= 0.7.1
  spandrel==0.4.2
  trampoline==0.1.2
  torchsde==0.2.6
  omegaconf==2.4.0             # modelopt: >= 2.3.0
  nvidia-ml-py==13.615.71      # modelopt: >= 12
  nvidia-modelopt==0.47.0      # ours: >= 0.45
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
# Newer glibc tags only where a wheel has no older build (the image's glibc is recent).
EXTRA_PLATFORMS=(manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

mkdir -p "$DEV/wheels"
shopt -s nullglob nocaseglob
# A wheel's file name starts with its project name, lower-cased by most builders, "-" as "_".
wheel_prefix() { local name=${1%%==*}; echo "${name//-/_}-${1##*==}-"; }

wanted=()
for spec in "${WHEELS[@]}"; do
  prefix=$(wheel_prefix "$spec")
  found=("$DEV/wheels/$prefix"*.whl)
  if [ ${#found[@]} -eq 0 ]; then
    pargs=()
    for p in "${PLATFORMS[@]}"; do pargs+=(--platform "$p"); done
    # -qq: the machine's pip config names local indexes that warn for every package they lack
    dl=(python3 -m pip download -qq --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEV/wheels")
    if ! "${dl[@]}" "${pargs[@]}" "$spec"; then
      for p in "${EXTRA_PLATFORMS[@]}"; do pargs+=(--platform "$p"); done
      echo "device_carry: no manylinux <= 2.28 wheel of $spec; trying newer glibc tags" >&2
      "${dl[@]}" "${pargs[@]}" "$spec"
    fi
    found=("$DEV/wheels/$prefix"*.whl)
  fi
  if [ ${#found[@]} -ne 1 ]; then
    echo "device_carry: expected one wheel for $spec in $DEV/wheels, found ${#found[@]}" >&2
    exit 1
  fi
  wanted+=("$(basename "${found[0]}")")
done
# One version of each: wheels no longer pinned (an older version, a dropped package) go.
for w in "$DEV/wheels"/*.whl; do
  keep=0
  for k in "${wanted[@]}"; do [ "$(basename "$w")" = "$k" ] && keep=1; done
  if [ $keep -eq 0 ]; then echo "device_carry: removing unpinned $(basename "$w")"; rm -f "$w"; fi
done
shopt -u nocaseglob

# --- ComfyUI ------------------------------------------------------------------------------------
# Everything that `main.py`, `nodes`, `execution`, `server`, `comfy_extras` and the API nodes
# (imported by nodes.init_extra_nodes) need, including the tokenizer files of the text encoders
# and requirements.txt (the frontend manager reads its pins). User data and models stay behind;
# models/configs (small YAMLs the checkpoint loaders read) comes along.
rm -rf "$DEV/comfyui"
mkdir -p "$DEV/comfyui"
tar -C "$COMFYUI_PATH" --anchored --exclude-vcs \
  --exclude=./tests --exclude=./tests-unit --exclude=./script_examples \
  --exclude=./.ci --exclude=./.github --exclude=./.venv --exclude=./venv \
  --exclude='./models/*' --exclude='./custom_nodes/*' --exclude='./input/*' --exclude='./output/*' \
  --exclude=./temp --exclude=./user --exclude=./web_custom_versions \
  --no-anchored --exclude=__pycache__ --exclude='*.pyc' \
  -cf - . | tar -C "$DEV/comfyui" -xf -
# custom_nodes/ must exist (nodes.py lists it); empty folders may not travel, so each gets a file.
for d in custom_nodes input output; do mkdir -p "$DEV/comfyui/$d" && touch "$DEV/comfyui/$d/.keep"; done
if [ -d "$COMFYUI_PATH/models/configs" ]; then
  tar -C "$COMFYUI_PATH" --exclude=__pycache__ -cf - ./models/configs | tar -C "$DEV/comfyui" -xf -
fi

# --- stubs --------------------------------------------------------------------------------------
rm -rf "$DEV/stubs"
mkdir -p "$DEV/stubs"

# Versions the frontend manager compares with ComfyUI's requirements.txt (importlib.metadata).
pin_of() { sed -n "s/^$1==\([0-9.]*\).*/\1/p" "$COMFYUI_PATH/requirements.txt" | head -1; }
frontend_version=$(pin_of comfyui-frontend-package)
templates_version=$(pin_of comfyui-workflow-templates)
docs_version=$(pin_of comfyui-embedded-docs)

# make_dist PROJECT VERSION: the dist-info that importlib.metadata.version(PROJECT) finds.
make_dist() {
  local d="$DEV/stubs/${1//-/_}-${2:-0.0.0}.dist-info"
  mkdir -p "$d"
  printf 'Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: inert stand-in (scripts/device_carry.sh)\n' "$1" "${2:-0.0.0}" > "$d/METADATA"
}

# The server only looks these packages' folders up (and serves them as static routes, which
# need the folders to exist); a headless run never fetches the files.
mkdir -p "$DEV/stubs/comfyui_frontend_package/static" "$DEV/stubs/comfyui_workflow_templates/templates" \
  "$DEV/stubs/comfyui_embedded_docs/docs"
for pkg in comfyui_frontend_package comfyui_workflow_templates comfyui_embedded_docs; do
  echo '"""Inert stand-in (scripts/device_carry.sh): the server only looks up its data folder."""' > "$DEV/stubs/$pkg/__init__.py"
done
echo '<!doctype html><title>ComfyUI</title><p>Headless: no frontend on this machine.</p>' \
  > "$DEV/stubs/comfyui_frontend_package/static/index.html"
echo '[]' > "$DEV/stubs/comfyui_workflow_templates/templates/index.json"
echo 'No embedded docs on this machine.' > "$DEV/stubs/comfyui_embedded_docs/docs/README.txt"
make_dist comfyui-frontend-package "$frontend_version"
make_dist comfyui-workflow-templates "$templates_version"
make_dist comfyui-embedded-docs "$docs_version"

# PyAV: ComfyUI imports av, av.container.InputContainer and av.subtitles.stream.SubtitleStream
# at start-up for its video / audio nodes (annotations, isinstance checks, a version canary);
# torchvision.io probes av.logging and av.video.frame.VideoFrame. Every other attribute is an
# empty class; opening media raises. No dist-info, so transformers reports av as unavailable.
mkdir -p "$DEV/stubs/av/container" "$DEV/stubs/av/subtitles" "$DEV/stubs/av/video" "$DEV/stubs/av/audio"
cat > "$DEV/stubs/av/_inert.py" <<'EOF'
"""Module-level __getattr__ for the PyAV stand-in: every public name is an empty class."""


def inert_getattr(module_name, namespace):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        cls = type(name, (), {"__module__": module_name})
        namespace[name] = cls
        return cls

    return __getattr__
EOF
cat > "$DEV/stubs/av/__init__.py" <<'EOF'
"""Inert stand-in for PyAV (scripts/device_carry.sh): the lent GPU machine has no PyAV and its
wheel is too big to carry. ComfyUI imports it at start-up; nothing run there decodes media."""
from av._inert import inert_getattr

# comfy_api_nodes/canary.py wants >= 14.2 before the API nodes import, as on a real host.
__version__ = "14.2.0"
time_base = 1000000

# Submodules first: with __getattr__ in place, `from av import video` would get a class.
from av import audio, container, logging, subtitles, video  # noqa: E402,F401


def open(*args, **kwargs):
    raise RuntimeError("PyAV is not installed here: av is an inert stand-in (no media I/O)")


__getattr__ = inert_getattr(__name__, globals())
EOF
cat > "$DEV/stubs/av/logging.py" <<'EOF'
"""av.logging stand-in: torchvision.io calls set_level(ERROR) when av imports."""
CRITICAL, ERROR, WARNING, INFO, VERBOSE, DEBUG, TRACE = 50, 40, 30, 20, 10, 5, 1
PANIC, FATAL = 60, 50


def set_level(level):
    pass


def get_level():
    return ERROR


def restore_default_callback():
    pass
EOF
# Packages import their submodules before defining __getattr__ (see av/__init__.py).
subpackage() {  # subpackage NAME SUBMODULE...
  local f="$DEV/stubs/av/$1/__init__.py" m
  echo 'from av._inert import inert_getattr' > "$f"
  for m in "${@:2}"; do
    echo "from av.$1 import $m  # noqa: F401" >> "$f"
    printf 'from av._inert import inert_getattr\n\n__getattr__ = inert_getattr(__name__, globals())\n' > "$DEV/stubs/av/$1/$m.py"
  done
  printf '\n__getattr__ = inert_getattr(__name__, globals())\n' >> "$f"
}
subpackage container input output
subpackage subtitles stream
subpackage video frame stream
subpackage audio frame stream

# PuLP (36 MB installed): modelopt.torch.opt.searcher imports it and names pulp.LpVariable /
# pulp.LpProblem in annotations evaluated at import; only its MIP search (not quantization)
# solves anything. Every public name is an empty class.
mkdir -p "$DEV/stubs/pulp"
cat > "$DEV/stubs/pulp/__init__.py" <<'EOF'
"""Inert stand-in for PuLP (scripts/device_carry.sh): modelopt imports it; quantization never
solves a linear program. Every public name is an empty class."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(f"module 'pulp' has no attribute {name!r}")
    cls = type(name, (), {"__module__": __name__})
    globals()[name] = cls
    return cls
EOF

# --- sizes --------------------------------------------------------------------------------------
device_bytes=$(du -sb "$DEV" | cut -f1)
# What travels: tracked and untracked-but-not-ignored files, plus .device/.
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | python3 -c '
import os, sys
paths = [p for p in sys.stdin.buffer.read().decode().split("\0") if p]
print(sum(os.lstat(p).st_size for p in paths if os.path.lexists(p)))')
total=$((device_bytes + tree_bytes))
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
echo "device_carry: $DEV/ $(mb "$device_bytes") (wheels $(mb "$(du -sb "$DEV/wheels" | cut -f1)"), comfyui $(mb "$(du -sb "$DEV/comfyui" | cut -f1)"), stubs $(mb "$(du -sb "$DEV/stubs" | cut -f1)")); working tree $(mb "$tree_bytes"); travelling $(mb "$total") of $(mb $MAX_TREE_BYTES)"
if [ "$device_bytes" -gt "$MAX_DEVICE_BYTES" ]; then
  echo "device_carry: $DEV/ is over $(mb $MAX_DEVICE_BYTES)" >&2
  exit 1
fi
if [ "$total" -gt "$MAX_TREE_BYTES" ]; then
  echo "device_carry: the working tree plus $DEV/ is over 64 MiB" >&2
  exit 1
fi
