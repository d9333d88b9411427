# Sourced on the lent GPU machine, from the repo root, after scripts/device_carry.sh prepared
# .device/ here and the call carried it:   source scripts/device_env.sh
# Installs the carried wheels into /tmp/site (no index there), puts them and the stubs on
# PYTHONPATH, points COMFYUI_PATH at the carried ComfyUI, and checks the imports. Returns non-zero,
# saying what failed, instead of exiting: it runs in the caller's shell.
# shellcheck shell=bash

if ! (return 0 2>/dev/null); then
  echo "device_env: source this file (source scripts/device_env.sh); running it changes nothing" >&2
  exit 1
fi

_fastgen_device_env() {
  local root=$PWD site=/tmp/site
  local wheels=("$root"/.device/wheels/*.whl)
  if [ ! -f "$root/.device/comfyui/main.py" ] || [ ! -e "${wheels[0]:-}" ] || [ ! -d "$root/.device/stubs" ]; then
    echo "device_env: no .device/ in $root (run scripts/device_carry.sh, carry .device, source from the repo root)" >&2
    return 1
  fi
  # A machine kept warm between calls already has them, checked: the stamp names the wheel list
  # that was installed and whose imports passed. Then only a quick look-up (the full import
  # check costs ~20 s, mostly modelopt importing torch and transformers).
  local stamp="$site/.fastgen-wheels" listing checked=0
  listing=$(cd "$root/.device/wheels" && ls -1 -- *.whl)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$listing" ]; then
    checked=1
  else
    rm -f "$stamp"
    # --upgrade replaces what an earlier list left in the target; --no-deps: the list is complete.
    if ! python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index \
        --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"; then
      echo "device_env: pip could not install .device/wheels into $site" >&2
      return 1
    fi
  fi
  # /tmp/site first: its typing-extensions (>= 4.16, for pydantic) must win over the image's.
  case ":${PYTHONPATH:-}:" in
    *":$site:$root/.device/stubs:"*) ;;
    *) export PYTHONPATH="$site:$root/.device/stubs${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
  export COMFYUI_PATH="$root/.device/comfyui"
  local modules="typing_extensions, pydantic, pydantic_settings, sqlalchemy, alembic, kornia, spandrel, torchsde, omegaconf, av, pulp, comfyui_frontend_package, modelopt"
  if [ $checked = 1 ]; then
    python3 -c "
import importlib.util, sys
missing = [m for m in '$modules'.split(', ') if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f'device_env: missing {missing}')
print('device_env: ok (installed and checked earlier on this machine); COMFYUI_PATH=$COMFYUI_PATH')
" || { echo "device_env: rm $stamp and source again to reinstall" >&2; return 1; }
    return 0
  fi
  # -W ignore: modelopt warns, at import, about plugins and transformers versions it has not tested.
  python3 -W ignore -c "
import $modules, modelopt.torch.quantization, torch
assert typing_extensions.__file__.startswith('$site/'), 'typing_extensions from ' + typing_extensions.__file__
print(f'device_env: ok (torch {torch.__version__}, pydantic {pydantic.VERSION}, sqlalchemy {sqlalchemy.__version__}, '
      f'kornia {kornia.__version__}, modelopt {modelopt.__version__}; av and pulp are stand-ins); COMFYUI_PATH=$COMFYUI_PATH')
" || {
    echo "device_env: the carried packages do not import (see above)" >&2
    return 1
  }
  printf '%s\n' "$listing" > "$stamp"
}

_fastgen_device_env
_fastgen_device_env_rc=$?
unset -f _fastgen_device_env
return $_fastgen_device_env_rc
