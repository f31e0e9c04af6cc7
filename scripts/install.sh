#!/usr/bin/env bash
# Sets up everything moss-agent and its tests use, on a fresh Debian/Ubuntu machine:
#   1. Debian packages (PortAudio, JACK, mosquitto, espeak-ng, Chromium) through apt-get,
#      as root or through sudo; otherwise it prints the apt-get command to run and goes on.
#      Skip this step with --no-system or MOSS_SKIP_SYSTEM=1.
#   2. .venv with moss-agent, every extra and the dev tools. Without an NVIDIA GPU (or with
#      MOSS_CPU_ONLY=1) it installs the CPU build of torch first (a few hundred MB instead of several GB).
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(libportaudio2 jackd2 mosquitto espeak-ng chromium)
skip_system=${MOSS_SKIP_SYSTEM:-0}
for arg in "$@"; do
  case "$arg" in
    --no-system) skip_system=1 ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

install_system_packages() {
  local apt_command="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${SYSTEM_PACKAGES[*]}"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no apt-get here; install these with your package manager: ${SYSTEM_PACKAGES[*]}" >&2
    return
  fi
  local missing=()
  for package in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo"
    else
      echo "install.sh: not root and no password-less sudo; the tests that need system packages will be skipped." >&2
      echo "  Run this as root, then run install.sh again:  $apt_command" >&2
      return
    fi
  fi
  echo "install.sh: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [ "$skip_system" = 1 ]; then
  echo "install.sh: skipping Debian packages (${SYSTEM_PACKAGES[*]})"
else
  install_system_packages
fi

PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1 || [ "${MOSS_CPU_ONLY:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -q -e ".[all,dev]"
echo "installed: activate with 'source .venv/bin/activate'"
