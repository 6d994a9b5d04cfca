# Sourced by deploy/quickstart.sh, deploy/test.sh and .ci/run: installs what the build and the
# sandboxes need when missing, and points cargo at a shared, persistent build cache.
#
# - Debian packages: bubblewrap (sandboxes), libclang (bindgen for RocksDB), sccache (compiler
#   cache), git, iproute2 and iptables (network namespaces and partitions of the chaos tests).
#   Installed with apt-get only when missing.
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
  if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
    missing+=(libclang1-14 libclang-common-14-dev)
  elif ! ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1; then
    missing+=(libclang-common-14-dev)
  fi
  echo "${missing[@]:-}"
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
