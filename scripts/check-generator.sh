#!/usr/bin/env bash
# The module generator, end to end: `cargo xtask new-module` writes a module that builds
# alone and beside every module, passes its own tests and clippy, is served and documented
# with exactly its operations; `cargo xtask remove-module` leaves the tree as it was.
# Run by scripts/test.sh; needs RUN (a scratch folder).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${GENERATED_MODULE:-scratch_items}
camel=ScratchItems
operations="create${camel}Item,get${camel}Item,list${camel}Items"
[ "$name" = scratch_items ] || { echo "GENERATED_MODULE must stay scratch_items (operation ids)"; exit 2; }
before=$(git status --porcelain)
cleanup() { [ -d "modules/$name" ] && cargo xtask remove-module "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

cargo xtask new-module "$name"
# What the generator changed: the new crate and the link lines, nothing else.
changed=$(comm -13 <(echo "$before" | sort) <(git status --porcelain | sort))
expected=$(printf '%s\n' " M Cargo.toml" " M server/Cargo.toml" " M server/src/modules.rs" "?? modules/$name/" | sort)
if [ "$changed" != "$expected" ]; then
  printf 'the generator changed:\n%s\nexpected:\n%s\n' "$changed" "$expected"
  exit 1
fi
git diff --stat

cargo fmt --all -- --check
cargo clippy -p "trellis-$name" --all-targets -- -D warnings
cargo test -q -p "trellis-$name"

# Alone (with `common` for the module list) and beside every default module.
cargo build -p trellis-server --no-default-features --features "common,$name,sqlite"
cp target/debug/trellis "$RUN/trellis-generated-alone"
cargo build -p trellis-server --features "$name"
cp target/debug/trellis "$RUN/trellis-generated-all"
# The server's default modules: its default features that are module crates.
defaults=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, os, sys
server = next(p for p in json.load(sys.stdin)["packages"] if p["name"] == "trellis-server")
print(",".join(f for f in server["features"]["default"] if os.path.isdir(f"modules/{f}")))')
for build in "alone|common,$name" "all|$defaults,$name"; do
  IFS='|' read -r which modules <<<"$build"
  echo "generated module, $which: modules [$modules]"
  TEST_SUBSET_BIN="$RUN/trellis-generated-$which" TEST_SUBSET_MODULES="$modules" \
    TEST_SUBSET_OPERATIONS="$name=$operations" \
    cargo test -q -p trellis-tests --test subset -- --ignored
done

cargo xtask remove-module "$name"
cargo tree -p xtask >/dev/null # settles Cargo.lock without the module
after=$(git status --porcelain)
if [ "$after" != "$before" ]; then
  printf 'after removal the tree differs:\n%s\n' "$(diff <(echo "$before") <(echo "$after") || true)"
  exit 1
fi
echo "generator: generated, built, tested, documented and removed without a trace"
