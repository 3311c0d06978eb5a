#!/usr/bin/env bash
# Checks ARCHITECTURE.md against the code, so the map does not drift from the
# territory. Lists every name that is missing and exits non-zero; prints one
# summary line when all are present. Reads files only (no cargo).
#
# What it checks, for each `code span` outside fenced blocks:
# - a repository path (contains `/`, or ends in .rs .toml .md .sh .yaml; a
#   trailing `/` or `::item` is dropped; `*` globs must match something)
#   exists as a file or directory;
# - a type-like name (`Shard`, `ShardCall<M>`: generics dropped) is defined
#   in some .rs file under actors/ runtime/ sim/ faults/: `struct`, `enum`,
#   `trait`, `type`, `union`, or an enum variant (`X {`, `X(`, `X,` at the
#   start of a line);
# - an ALL_CAPS name is a `const` or `static`, unless it is on the short
#   allow-list below (status names, file names: not code identifiers);
# - a qualified name (`MetaOps::claim_volume`, `Call::Sweep`,
#   `check::linearizable`) has its type and member defined (`fn`, `mod`,
#   variant); paths into other crates (`std::`, `tokio::`) are skipped;
# - an `attache-*` name is a package or binary name in a Cargo.toml, or a
#   string literal in the code (`attache-rejected`).
# Also: every scenarios/NAME.toml the file names exists, every file in
# scenarios/*.toml is named in it, and every Markdown link points at a file
# or directory inside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

doc=ARCHITECTURE.md
if [ ! -f "$doc" ]; then
    echo "check-architecture: $doc is missing" >&2
    exit 1
fi

# Backticked words that look like constants but are not code identifiers.
allow=" UNAVAILABLE INVALID_ARGUMENT NOT_FOUND PERMISSION_DENIED FAILED_PRECONDITION RESOURCE_EXHAUSTED STALE_OK EPOCH LOCK CLOCK_BOOTTIME CLOCK_MONOTONIC "

mapfile -t rs < <(find actors runtime sim faults -name '*.rs' -not -path '*/target/*' | sort)
if [ "${#rs[@]}" -eq 0 ]; then
    echo "check-architecture: no .rs files under actors/ runtime/ sim/ faults/" >&2
    exit 1
fi

missing=()
checked=0

defined_type() { # struct/enum/trait/type/union NAME, or an enum variant NAME
    grep -qE "\\b(struct|enum|trait|type|union)[[:space:]]+$1\\b|^[[:space:]]*$1[[:space:]]*(\\{|\\(|,|\$)" "${rs[@]}"
}
defined_const() {
    grep -qE "\\b(const|static)[[:space:]]+$1\\b" "${rs[@]}"
}
defined_fn() { # fn, mod or macro NAME
    grep -qE "\\b(fn|mod)[[:space:]]+$1\\b|macro_rules![[:space:]]*$1\\b" "${rs[@]}"
}
repo_module() { # a crate or module of this repository
    case "$1" in
        attache_*) [ -d "${1#attache_}" ] ;;
        crate | self | super) return 1 ;;
        *) find actors runtime sim faults -path '*/src/*' \( -name "$1.rs" -o -type d -name "$1" \) | grep -q . ;;
    esac
}
is_caps() { [[ $1 =~ ^[A-Z][A-Z0-9_]+$ ]]; }
is_type() { [[ $1 =~ ^[A-Z][A-Za-z0-9_]*$ ]]; }
is_path() {
    [[ $1 =~ ^[A-Za-z0-9_.][A-Za-z0-9_.*/-]*$ ]] && [[ $1 == */* || $1 =~ \.(rs|toml|md|sh|yaml)$ ]]
}
miss() { missing+=("$1"); }

check_path() {
    local p=${1%/}
    checked=$((checked + 1))
    if [[ $p == *'*'* ]]; then
        compgen -G "$p" >/dev/null || miss "\`$1\`: no file matches"
    else
        [ -e "$p" ] || miss "\`$1\`: no such file or directory"
    fi
}

check_segment() { # one segment of a qualified name: a type, variant, const, or fn/mod
    local s=$1 whole=$2
    if is_caps "$s"; then
        defined_const "$s" || defined_type "$s" || miss "\`$whole\`: no const, type or variant $s"
    elif is_type "$s"; then
        defined_type "$s" || miss "\`$whole\`: no type or variant $s"
    elif [[ $s =~ ^[a-z_][a-z0-9_]*$ ]]; then
        defined_fn "$s" || miss "\`$whole\`: no fn or mod $s"
    fi
}

check_qualified() {
    local tok=$1 plain
    # Drop generics (innermost first) and a trailing `()`.
    plain=$tok
    while [[ $plain == *'<'* ]]; do plain=$(sed -E 's/<[^<>]*>//g' <<<"$plain"); done
    plain=${plain%()}
    local -a segs
    IFS=: read -r -a segs <<<"${plain//::/:}"
    local first=${segs[0]}
    if is_type "$first"; then
        checked=$((checked + 1))
        local s
        for s in "${segs[@]}"; do check_segment "$s" "$tok"; done
    elif repo_module "$first"; then
        checked=$((checked + 1))
        check_segment "${segs[${#segs[@]} - 1]}" "$tok"
    fi
}

# Code spans outside fenced blocks (joined into one line, so a span broken
# across lines holds a space and is skipped), unique.
mapfile -t tokens < <(awk '/^[[:space:]]*```/ { fenced = !fenced; next } !fenced' "$doc" |
    tr '\n' ' ' | grep -o '`[^`]*`' | sed 's/^`//; s/`$//' | sort -u)

for tok in "${tokens[@]}"; do
    [ -n "$tok" ] || continue
    [[ $tok == *[[:space:]]* ]] && continue
    head=${tok%%::*}
    if is_path "$head"; then
        check_path "$head"
    elif [[ $tok == *::* ]]; then
        check_qualified "$tok"
    elif [[ $tok =~ ^attache-[a-z-]+$ ]]; then
        checked=$((checked + 1))
        grep -qF "\"$tok\"" Cargo.toml ./*/Cargo.toml "${rs[@]}" ||
            miss "\`$tok\`: no package, binary or string literal \"$tok\""
    elif is_caps "$tok"; then
        [[ $allow == *" $tok "* ]] && continue
        checked=$((checked + 1))
        defined_const "$tok" || miss "\`$tok\`: no const or static $tok (or add it to the allow-list in $0)"
    elif [[ $tok =~ ^[A-Z][A-Za-z0-9_]*(<.*>)?$ ]]; then
        name=${tok%%<*}
        checked=$((checked + 1))
        defined_type "$name" || miss "\`$tok\`: no struct, enum, trait, type or variant $name in actors/ runtime/ sim/ faults/"
    fi
done

# Scenarios: every one named exists (anywhere in the file), every file is named.
while read -r s; do
    [ -n "$s" ] || continue
    checked=$((checked + 1))
    [ -f "$s" ] || miss "$s: named in $doc but does not exist"
done < <(grep -oE 'scenarios/[A-Za-z0-9_.-]+\.toml' "$doc" | sort -u)
for f in scenarios/*.toml; do
    [ -e "$f" ] || continue
    checked=$((checked + 1))
    grep -qF "$f" "$doc" || miss "$f: not described in $doc (add one line on what it does)"
done

# Links: inside the repository, and existing.
while read -r link; do
    [ -n "$link" ] || continue
    target=${link#](}
    target=${target%)}
    target=${target%%#*}
    target=${target%% *}
    [ -n "$target" ] || continue
    checked=$((checked + 1))
    if [[ $target =~ ^[A-Za-z][A-Za-z0-9+.-]*: || $target == /* || $target == *..* ]]; then
        miss "link ($target): points outside the repository"
    elif [ ! -e "$target" ]; then
        miss "link ($target): no such file or directory"
    fi
done < <(grep -oE '\]\([^)]*\)' "$doc" | sort -u)

if [ "${#missing[@]}" -gt 0 ]; then
    printf 'missing: %s\n' "${missing[@]}"
    echo "check-architecture: ${#missing[@]} of $checked names missing from the code (fix $doc, or the code)"
    exit 1
fi
echo "check-architecture: $checked names checked, all present"
