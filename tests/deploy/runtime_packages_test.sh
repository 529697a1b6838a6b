#!/usr/bin/env bash
# The image's runtime stage installs only `deploy/setup.sh --runtime`: check
# that those packages, with their dependencies, provide every shared library
# the built binaries load (so the small image can run what the build stage
# built). Uses this machine's dpkg database, where the binaries were built.
#
#   runtime_packages_test.sh BINARY...
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
(($#)) || { echo "usage: $0 BINARY..." >&2; exit 2; }

mapfile -t runtime < <("${repo}/deploy/setup.sh" --runtime --list)

# The runtime packages and everything they depend on (installed here, since
# the -dev packages of the build depend on them).
declare -A closure=()
queue=("${runtime[@]}")
while ((${#queue[@]})); do
  package="${queue[0]}"
  queue=("${queue[@]:1}")
  [[ -n "${closure[${package}]:-}" ]] && continue
  closure["${package}"]=1
  depends="$(dpkg-query -W -f='${Depends},${Pre-Depends}' "${package}" 2>/dev/null)" || {
    echo "runtime package ${package} is not installed here" >&2
    exit 1
  }
  # "a (>= 1), b | c, d:any" -> a b c d (every alternative counts).
  IFS=',' read -ra dependencies <<<"${depends//|/,}"
  for dependency in "${dependencies[@]}"; do
    dependency="${dependency%%(*}"
    dependency="${dependency//[[:space:]]/}"
    dependency="${dependency%:any}"
    if [[ -n "${dependency}" ]]; then queue+=("${dependency}"); fi
  done
done

# Every library the binaries load, and the package owning each, in one dpkg
# query (Debian 12 merges /lib into /usr/lib; dpkg knows one spelling).
declare -A libraries_of=()
declare -A candidates=()
for binary in "$@"; do
  [[ -x "${binary}" ]] || { echo "${binary}: not built" >&2; exit 1; }
  libraries_of["${binary}"]="$(ldd "${binary}" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')"
  while read -r library; do
    for candidate in "${library}" "$(realpath "${library}")" \
      "${library/#\/lib\//\/usr\/lib\/}" "${library/#\/usr\/lib\//\/lib\/}"; do
      candidates["${candidate}"]=1
    done
  done <<<"${libraries_of[${binary}]}"
done
declare -A owner_of=()
while IFS= read -r line; do
  owner_of["${line#*: }"]="${line%%:*}"
done < <(dpkg -S "${!candidates[@]}" 2>/dev/null || true)

missing=0
for binary in "$@"; do
  count=0
  while read -r library; do
    count=$((count + 1))
    owner=""
    for candidate in "${library}" "$(realpath "${library}")" \
      "${library/#\/lib\//\/usr\/lib\/}" "${library/#\/usr\/lib\//\/lib\/}"; do
      owner="${owner_of[${candidate}]:-}"
      [[ -n "${owner}" ]] && break
    done
    if [[ -z "${owner}" ]]; then
      echo "$(basename "${binary}"): ${library} belongs to no package" >&2
      missing=$((missing + 1))
    elif [[ -z "${closure[${owner}]:-}" ]]; then
      echo "$(basename "${binary}"): ${library} (${owner}) is not installed by setup.sh --runtime" >&2
      missing=$((missing + 1))
    fi
  done <<<"${libraries_of[${binary}]}"
  echo "$(basename "${binary}"): ${count} shared libraries checked"
done
((missing == 0))
echo "ok: every library comes from setup.sh --runtime's packages"
