#!/usr/bin/env bash
# prepare-repositories.sh — build the quick start's fleet of real Rust repositories.
#
# Usage: deploy/prepare-repositories.sh <directory> [count]
#
# Downloads the published sources of the first <count> (default 120) crates of the fixed,
# pinned list below from crates.io, with cargo as the only network client (a throwaway
# Cargo project lists them as `=x.y.z` dependencies and `cargo fetch` downloads the .crate
# archives into cargo's own cache; nothing is built). Each crate then becomes:
#
#   <directory>/src/<name>/         a git repository: one commit of the sources exactly as
#                                   published (all files, even ones the crate's .gitignore
#                                   would ignore), on branch `main`, with a fixed author and
#                                   date so the commit hash is reproducible;
#   <directory>/origin/<name>.git   its bare origin, `main` pushed — what the fleet targets;
#
# and <directory>/repositories.txt lists the origins as file:// URLs, one per line, in the
# order of the list.
#
# Idempotent: a crate whose bare origin already has `main` is left as it is, so a rerun only
# downloads what is missing (nothing, when everything is there) and rewrites repositories.txt.
# Partial work of an interrupted run is redone.
#
# The list is a broad set of popular crates.io crates, not chosen by how they are formatted:
# under the current rustfmt some of them change and some do not. The versions were resolved
# together, so any prefix of the list resolves in one Cargo project (no `links` or exact-pin
# conflicts). Three popular crates are left out because their published sources cannot be
# formatted offline at all: regex and regex-automata (tests/lib.rs declares `mod fuzz;`, whose
# file is not published) and dashmap (its rust-toolchain.toml pins a toolchain rustup would
# have to download).
#
# The fleet's agent and verification commands, which work in every one of these repositories
# offline (no network, empty CARGO_HOME: `cargo fmt` only reads the crate's own manifest via
# `cargo metadata --no-deps`):
#   agent:   cargo fmt --all
#   verify:  cargo fmt --all -- --check
#
# Environment: CARGO (default cargo), CARGO_HOME (cargo's cache, default ~/.cargo).
# Requires: cargo, git, tar.
set -euo pipefail

CRATES=(
  "serde 1.0.229"
  "serde_json 1.0.154"
  "serde_derive 1.0.229"
  "anyhow 1.0.104"
  "thiserror 2.0.21"
  "regex-syntax 0.8.12"
  "aho-corasick 1.1.5"
  "memchr 2.8.3"
  "itoa 1.0.19"
  "ryu 1.0.23"
  "log 0.4.35"
  "bitflags 2.13.2"
  "cfg-if 1.0.5"
  "libc 0.2.191"
  "lazy_static 1.5.1"
  "once_cell 1.21.4"
  "rand 0.10.4"
  "rand_core 0.10.1"
  "rand_chacha 0.10.0"
  "syn 3.0.10"
  "quote 1.0.47"
  "proc-macro2 1.0.107"
  "unicode-ident 1.0.27"
  "unicode-width 0.2.3"
  "unicode-segmentation 1.13.3"
  "unicode-normalization 0.1.26"
  "unicode-xid 0.2.6"
  "hashbrown 0.17.1"
  "indexmap 2.14.2"
  "smallvec 1.16.6"
  "arrayvec 0.7.8"
  "either 1.19.0"
  "itertools 0.15.0"
  "byteorder 1.5.0"
  "bytes 1.12.2"
  "base64 0.23.1"
  "hex 0.4.3"
  "sha2 0.11.1"
  "sha1 0.11.0"
  "md-5 0.11.0"
  "digest 0.11.3"
  "hmac 0.13.0"
  "generic-array 1.4.5"
  "typenum 1.20.1"
  "block-buffer 0.12.1"
  "crypto-common 0.2.2"
  "cpufeatures 0.3.1"
  "subtle 2.6.1"
  "getrandom 0.4.3"
  "time 0.3.55"
  "chrono 0.4.45"
  "humantime 2.4.0"
  "tokio 1.54.1"
  "tokio-util 0.7.20"
  "tokio-stream 0.1.19"
  "futures 0.3.34"
  "futures-core 0.3.34"
  "futures-util 0.3.34"
  "futures-channel 0.3.34"
  "futures-io 0.3.34"
  "futures-sink 0.3.34"
  "futures-task 0.3.34"
  "futures-executor 0.3.34"
  "pin-project-lite 0.2.18"
  "pin-project 1.1.13"
  "pin-utils 0.1.1"
  "slab 0.4.12"
  "mio 1.2.5"
  "socket2 0.6.5"
  "parking_lot 0.13.0"
  "parking_lot_core 0.10.0"
  "lock_api 0.5.0"
  "scopeguard 1.2.0"
  "crossbeam-utils 0.8.23"
  "crossbeam-channel 0.5.17"
  "crossbeam-epoch 0.9.21"
  "crossbeam-deque 0.8.8"
  "rayon 1.12.0"
  "rayon-core 1.13.0"
  "num-traits 0.2.19"
  "num-integer 0.1.47"
  "num-bigint 0.5.1"
  "autocfg 1.5.1"
  "semver 1.0.28"
  "toml 1.2.1+spec-1.1.0"
  "toml_edit 0.25.18+spec-1.1.0"
  "winnow 1.0.5"
  "clap 4.6.9"
  "clap_lex 1.1.2"
  "strsim 0.11.1"
  "heck 0.5.0"
  "anstyle 1.0.14"
  "termcolor 1.4.1"
  "env_logger 0.11.11"
  "tracing 0.1.44"
  "tracing-core 0.1.36"
  "tracing-subscriber 0.3.23"
  "http 1.5.0"
  "httparse 1.10.1"
  "httpdate 1.0.3"
  "url 2.5.8"
  "percent-encoding 2.3.2"
  "form_urlencoded 1.2.2"
  "mime 0.3.18"
  "fnv 1.0.7"
  "foldhash 0.2.0"
  "tempfile 3.27.0"
  "fastrand 2.5.0"
  "walkdir 2.5.0"
  "same-file 1.0.6"
  "glob 0.3.4"
  "globset 0.4.21"
  "dirs 7.0.0"
  "home 0.5.12"
  "which 8.0.6"
  "shlex 2.0.1"
  "cc 1.11.3"
  "pkg-config 0.3.34"
  "version_check 0.9.5"
  "rustc_version 0.4.1"
  "nom 8.0.0"
  "memoffset 0.9.1"
  "static_assertions 1.1.0"
  "zerocopy 0.8.63"
  "bstr 1.14.0"
  "encoding_rs 0.8.44"
  "flate2 1.1.11"
  "crc32fast 1.5.5"
  "adler2 2.0.1"
  "miniz_oxide 0.9.1"
  "lru 0.19.0"
  "uuid 1.29.3"
  "bincode 3.0.0"
  "csv 1.4.0"
  "similar 3.2.1"
  "pretty_assertions 1.4.1"
  "tinyvec 1.13.3"
  "ppv-lite86 0.2.21"
  "rustversion 1.0.23"
  "paste 1.0.15"
  "async-trait 0.1.92"
  "dyn-clone 1.0.20"
  "ref-cast 1.0.27"
  "eyre 0.6.14"
  "filetime 0.2.29"
  "num_cpus 1.17.0"
  "textwrap 0.16.4"
  "atomic-waker 1.1.2"
  "event-listener 5.4.2"
  "concurrent-queue 2.5.0"
  "spin 0.12.3"
  "camino 1.2.6"
  "indoc 2.0.8"
  "unindent 0.2.4"
  "ordered-float 5.5.1"
  "approx 0.5.1"
  "half 2.7.1"
  "fixedbitset 0.5.9"
  "petgraph 0.8.3"
  "quick-error 2.0.1"
  "scoped-tls 1.0.1"
  "thread_local 1.1.10"
  "sharded-slab 0.1.7"
  "want 0.3.2"
  "try-lock 0.2.5"
  "tower-service 0.3.3"
  "tower-layer 0.3.3"
  "utf8parse 0.2.2"
  "strum 0.28.0"
  "libm 0.2.16"
  "siphasher 1.0.4"
  "unicase 2.10.0"
  "rustc-hash 2.1.3"
  "twox-hash 2.1.5"
  "data-encoding 2.11.1"
  "zeroize 1.9.2"
  "constant_time_eq 0.6.1"
  "arrayref 0.3.9"
  "memmap2 0.9.12"
  "bytemuck 1.25.2"
  "base16ct 1.0.0"
  "hashlink 0.12.2"
  "phf 0.14.0"
  "phf_shared 0.14.0"
)

die() { echo "prepare-repositories: error: $*" >&2; exit 1; }
say() { echo "prepare-repositories: $*" >&2; }

if [[ $# -lt 1 || $# -gt 2 || "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
  exit 2
fi
count="${2:-120}"
[[ "$count" =~ ^[0-9]+$ && "$count" -ge 1 ]] || die "count must be a positive integer, got '$count'"
[[ "$count" -le ${#CRATES[@]} ]] || die "count $count exceeds the ${#CRATES[@]} crates of the list"

cargo_bin="${CARGO:-cargo}"
for tool in "$cargo_bin" git tar; do
  command -v "$tool" >/dev/null || die "'$tool' not found in PATH"
done

mkdir -p "$1"
root="$(cd "$1" && pwd -P)"
mkdir -p "$root/src" "$root/origin"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"

# Reproducible commits; no user or system git configuration leaks in.
export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null
export GIT_AUTHOR_NAME="crates.io import" GIT_AUTHOR_EMAIL="import@flotilla.invalid"
export GIT_COMMITTER_NAME="crates.io import" GIT_COMMITTER_EMAIL="import@flotilla.invalid"
export GIT_AUTHOR_DATE="2024-01-01T00:00:00Z" GIT_COMMITTER_DATE="2024-01-01T00:00:00Z"

done_already() { # <name>: the bare origin exists and has main
  git --git-dir="$root/origin/$1.git" rev-parse -q --verify refs/heads/main >/dev/null 2>&1
}

selected=("${CRATES[@]:0:$count}")
missing=()
for entry in "${selected[@]}"; do
  read -r name version <<<"$entry"
  done_already "$name" || missing+=("$name $version")
done
say "$count crates selected, $(( count - ${#missing[@]} )) already prepared, ${#missing[@]} to prepare in $root"

if (( ${#missing[@]} > 0 )); then
  work="$(mktemp -d "${TMPDIR:-/tmp}/flotilla-prepare.XXXXXX")"
  trap 'rm -rf "$work"' EXIT

  # A throwaway project whose dependencies are the missing crates at their exact versions.
  # default-features = false keeps the transitive graph (downloaded, never built) small.
  mkdir -p "$work/project/src"
  : >"$work/project/src/lib.rs"
  {
    printf '[package]\nname = "flotilla-fleet-sources"\nversion = "0.0.0"\nedition = "2021"\npublish = false\n\n[dependencies]\n'
    for entry in "${missing[@]}"; do
      read -r name version <<<"$entry"
      printf '%s = { version = "=%s", default-features = false }\n' "$name" "$version"
    done
  } >"$work/project/Cargo.toml"
  host="$("$cargo_bin" -vV 2>/dev/null | sed -n 's/^host: //p')"
  [[ -n "$host" ]] || host="$(rustc -vV | sed -n 's/^host: //p')"
  say "resolving and downloading ${#missing[@]} crates with cargo fetch (crates.io)"
  (cd "$work/project" && CARGO_TARGET_DIR="$work/target" "$cargo_bin" fetch --quiet --target "$host") \
    || die "cargo fetch failed (is crates.io reachable, and CARGO_HOME=$cargo_home writable?)"

  for entry in "${missing[@]}"; do
    read -r name version <<<"$entry"
    archive=""
    for candidate in "$cargo_home"/registry/cache/*/"$name-$version.crate"; do
      [[ -f "$candidate" ]] && { archive="$candidate"; break; }
    done
    [[ -n "$archive" ]] || die "$name $version: no $name-$version.crate under $cargo_home/registry/cache after cargo fetch"

    # Unpack into a fresh working copy (any leftover of an interrupted run is discarded).
    repo="$root/src/$name"
    rm -rf "$repo" "$root/src/.$name.tmp" "$root/origin/$name.git" "$root/origin/.$name.git.tmp"
    mkdir -p "$root/src/.$name.tmp"
    tar -xzf "$archive" --no-same-owner -C "$root/src/.$name.tmp"
    [[ -f "$root/src/.$name.tmp/$name-$version/Cargo.toml" ]] || die "$name $version: archive has no Cargo.toml"
    mv "$root/src/.$name.tmp/$name-$version" "$repo"
    rm -rf "$root/src/.$name.tmp"
    rm -rf "$repo/target" "$repo/.git"
    rm -f "$repo/.cargo-checksum.json" "$repo/.cargo-ok"

    git -C "$repo" init -q -b main
    git -C "$repo" config core.autocrlf false
    git -C "$repo" add -A -f .
    git -C "$repo" commit -q --no-verify -m "Import $name $version as published on crates.io"
    git init -q --bare -b main "$root/origin/.$name.git.tmp"
    git -C "$repo" push -q "$root/origin/.$name.git.tmp" main:main
    mv "$root/origin/.$name.git.tmp" "$root/origin/$name.git"
    git -C "$repo" remote add origin "file://$root/origin/$name.git"
    git -C "$repo" fetch -q origin
    git -C "$repo" branch -q --set-upstream-to=origin/main main
    say "prepared $name $version ($(git -C "$repo" ls-files | wc -l | tr -d ' ') files, $(git -C "$repo" rev-parse --short HEAD))"
  done
fi

list="$root/repositories.txt"
for entry in "${selected[@]}"; do
  read -r name _ <<<"$entry"
  done_already "$name" || die "$name: origin missing after preparation"
  echo "file://$root/origin/$name.git"
done >"$list.tmp"
mv "$list.tmp" "$list"
say "wrote $list ($count repositories)"
