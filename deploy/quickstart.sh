#!/usr/bin/env bash
# The quick start (README.md): the main job end to end on real input with embedded defaults.
#
# 1. installs what is missing (bubblewrap, libclang, sccache, git) and builds Flotilla;
# 2. prepares real open-source repositories: the published sources of COUNT popular crates,
#    downloaded from crates.io, each made a git repository with a bare origin;
# 3. runs `flotilla quickstart`: a single-node cluster (Raft on RocksDB) with a local worker,
#    an "enforce rustfmt" fleet over all repositories submitted over gRPC, watched with a
#    progress bar, ending with the roll-up (changed / unchanged / failed, diffstat per
#    repository, branch pushed, wall time).
#
# Environment: FLOTILLA_REPOSITORIES_DIRECTORY (default ~/.cache/flotilla/repositories),
# FLOTILLA_REPOSITORY_COUNT (default 120), CARGO_TARGET_DIR, RUSTC_WRAPPER (see deploy/env.sh).
# Extra arguments are passed to `flotilla quickstart` (e.g. --slots 4, --output json).
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/env.sh
flotilla_install_dependencies
flotilla_build_environment

repositories="${FLOTILLA_REPOSITORIES_DIRECTORY:-$HOME/.cache/flotilla/repositories}"
count="${FLOTILLA_REPOSITORY_COUNT:-120}"

echo "flotilla: building (first build compiles RocksDB: ~15-30 min on 2 cores; cached afterwards)" >&2
cargo build --locked --bin flotilla >&2
echo "flotilla: preparing $count real repositories in $repositories" >&2
bash deploy/prepare-repositories.sh "$repositories" "$count" >&2

# Each run starts from the published sources: reset the bare origins' fleet branch so that a
# second quick start shows the same roll-up instead of an already formatted origin.
for origin in "$repositories"/origin/*.git; do
  git --git-dir "$origin" branch -D flotilla/rustfmt >/dev/null 2>&1 || true
done

exec "$CARGO_TARGET_DIR/debug/flotilla" quickstart --repositories-file "$repositories/repositories.txt" "$@"
