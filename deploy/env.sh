# Sourced by deploy/quickstart.sh, deploy/test.sh and .ci/run: installs what the build and the
# sandboxes need when missing, and points cargo at a shared, persistent build cache.
#
# - Debian packages: bubblewrap (sandboxes), libclang (bindgen for RocksDB), sccache (compiler
#   cache), git, iproute2 and iptables (network namespaces and partitions of the chaos tests).
#   Installed with apt-get only when missing.
# - Python packages of the reflection test (node/tests/python/requirements.txt, pinned): into a
#   virtual environment at FLOTILLA_TEST_PYTHON_VENV (default ~/.cache/flotilla/python-venv),
#   made with the python3 on PATH (Debian's python3 needs python3-venv for that). The test runs
#   $FLOTILLA_TEST_PYTHON_VENV/bin/python3 and fails when it is missing.
# - CARGO_TARGET_DIR defaults to ~/.cache/flotilla/target, outside the clone, so fresh clones on
#   the same machine reuse the build; RUSTC_WRAPPER=sccache caches C++ and Rust objects too.
#   Both can be overridden from the environment.
set -euo pipefail

flotilla_missing_packages() {
  local missing=()
  command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
  command -v sccache >/dev/null 2>&1 || missing+=(sccache)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  command -v cc >/dev/null 2>&1 || missing+=(build-essential)
  if ! flotilla_has_libclang; then
    missing+=(libclang1-14)
  fi
  if ! flotilla_has_clang_headers; then
    missing+=(libclang-common-14-dev)
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
  elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian's python3 ships venv without ensurepip (in python3-venv), so `python3 -m venv` fails.
    missing+=(python3-venv)
  fi
  echo "${missing[@]:-}"
}

# bindgen (RocksDB's bindings) loads the C library libclang: the file libclang.so.1 or
# libclang-N.so.1 (Debian libclang1-N). libclang-cpp.so.N (libclang-cppN, shipped on a fresh
# machine of this kind) is the C++ library and does not serve bindgen, so only the exact C
# library names count. FLOTILLA_SYSTEM_ROOT (default empty: /) lets a test check a fake layout.
flotilla_has_libclang() {
  local root="${FLOTILLA_SYSTEM_ROOT:-}" candidate
  for candidate in "$root"/usr/lib/llvm-*/lib/libclang.so.1 "$root"/usr/lib/llvm-*/lib/libclang-*.so.1 \
    "$root"/usr/lib/*-linux-gnu/libclang.so.1 "$root"/usr/lib/*-linux-gnu/libclang-*.so.1; do
    case "$candidate" in
      *libclang-cpp*) continue ;;
    esac
    [ -e "$candidate" ] && return 0
  done
  return 1
}

# libclang also needs clang's own headers (stdbool.h and friends, Debian libclang-common-N-dev).
flotilla_has_clang_headers() {
  local root="${FLOTILLA_SYSTEM_ROOT:-}" candidate
  for candidate in "$root"/usr/lib/llvm-*/lib/clang/*/include/stdbool.h; do
    [ -e "$candidate" ] && return 0
  done
  return 1
}

flotilla_install_dependencies() {
  local missing
  missing=$(flotilla_missing_packages)
  if [ -n "$missing" ]; then
    echo "flotilla: installing missing packages: $missing" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >&2
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      echo "flotilla: cargo is required (install Rust with rustup)" >&2
      return 1
    fi
  fi
  if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then
    rustup component add rustfmt clippy >&2 || true
  fi
}

flotilla_build_environment() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
  mkdir -p "$CARGO_TARGET_DIR"
  if [ -z "${RUSTC_WRAPPER:-}" ] && command -v sccache >/dev/null 2>&1; then
    export RUSTC_WRAPPER=sccache
  fi
  export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
}

# Makes (or reuses) the virtual environment of the Python reflection test and installs the
# pinned packages of node/tests/python/requirements.txt into it. Reinstalls only when that file
# changed since the last install (a copy is kept in the environment).
flotilla_install_python_test_packages() {
  local venv="${FLOTILLA_TEST_PYTHON_VENV:-$HOME/.cache/flotilla/python-venv}"
  local requirements
  requirements="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/node/tests/python/requirements.txt"
  export FLOTILLA_TEST_PYTHON_VENV="$venv"
  if [ -x "$venv/bin/python3" ] && cmp -s "$requirements" "$venv/flotilla-requirements.txt"; then
    return 0
  fi
  echo "flotilla: installing the Python test packages into $venv" >&2
  python3 -m venv --clear "$venv" >&2
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check --no-input \
    --requirement "$requirements" >&2
  cp "$requirements" "$venv/flotilla-requirements.txt"
}
