#!/usr/bin/env bash
# Copy the shared libraries that a sluice binary needs at run time into one folder.
#
#   deploy/collect-runtime-libs.sh BINARY DEST_DIR
#
# The libtorch libraries (libtorch_cpu.so, libc10.so, ...) and the NVIDIA runtime
# libraries they link (libcudart, libcupti, ...) come from the PyTorch wheels of a
# virtual environment. This script resolves the binary's full dependency closure with
# ldd, searching the venv's library folders, and copies every library that does not
# come from a system folder (/lib, /lib64, /usr/lib, /usr/lib64) into DEST_DIR, flat,
# under the name the loader asks for; that includes libraries found through another
# library's rpath (libtorch_cpu finds libcudart via $ORIGIN/../../nvidia/...).
# Libraries from the system folders (libc, libm, libstdc++, libgcc_s, ...) are left to
# the base image, which must be the same Debian release as the build, and only listed.
#
# Some libraries are opened with dlopen() rather than linked, so ldd cannot see them;
# the known ones are added when the library that opens them is in the set
# (libcudnn -> its engine/ops sub-libraries, libnvrtc -> libnvrtc-builtins).
#
# Where the libraries are searched, first match wins:
#   SLUICE_LIB_DIRS   colon-separated folders, used as given
#   SLUICE_VENV       a virtual environment (default: $VIRTUAL_ENV, else <repo>/.venv);
#                     its site-packages/torch/lib and site-packages/nvidia/*/lib
#
# Exit status: 0 when every dependency resolved; 1 when one is "not found" or on a
# usage error. DEST_DIR is created; existing files in it are overwritten.
set -euo pipefail

die() { echo "collect-runtime-libs: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: $0 BINARY DEST_DIR"
binary=$1
dest=$2
[[ -f $binary ]] || die "binary not found: $binary"
command -v ldd >/dev/null || die "ldd is required (package libc-bin)"

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

search_dirs=()
if [[ -n ${SLUICE_LIB_DIRS:-} ]]; then
    IFS=: read -r -a search_dirs <<<"$SLUICE_LIB_DIRS"
else
    venv=${SLUICE_VENV:-${VIRTUAL_ENV:-$repo_root/.venv}}
    [[ -d $venv ]] || die "virtual environment not found: $venv (set SLUICE_VENV or SLUICE_LIB_DIRS)"
    shopt -s nullglob
    for site in "$venv"/lib/python3*/site-packages; do
        [[ -d $site/torch/lib ]] && search_dirs+=("$site/torch/lib")
        for d in "$site"/nvidia/*/lib; do
            search_dirs+=("$d")
        done
    done
    shopt -u nullglob
fi
[[ ${#search_dirs[@]} -gt 0 ]] || die "no library folders found (is torch installed in the venv?)"

for d in "${search_dirs[@]}"; do
    [[ -d $d ]] || die "library folder does not exist: $d"
done
lib_path=$(IFS=:; echo "${search_dirs[*]}")

is_system() { # PATH -> 0 when PATH (canonical) lies in a system library folder
    case $(readlink -f "$1") in
        /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) return 0 ;;
        *) return 1 ;;
    esac
}

declare -A ours=()     # loader name -> resolved path
declare -A system=()   # loader name -> resolved path
missing=()

resolve() { # FILE: add FILE's dependency closure to the maps
    local out line name path
    out=$(LD_LIBRARY_PATH="$lib_path" ldd "$1" 2>&1) || die "ldd failed on $1: $out"
    while IFS= read -r line; do
        line=${line#"${line%%[![:space:]]*}"}
        case $line in
            *"=> not found"*)
                missing+=("${line%% *} (needed by $(basename "$1"))") ;;
            *" => "/*)
                name=${line%% => *}
                path=${line#* => }
                path=${path% (0x*}
                if is_system "$path"; then system[$name]=$path; else ours[$name]=$path; fi ;;
            *) ;; # linux-vdso, the dynamic loader itself, statically linked
        esac
    done <<<"$out"
}

resolve "$binary"

# Libraries loaded with dlopen(): add them, then their own dependencies.
extras=()
for name in "${!ours[@]}"; do
    dir=$(dirname "$(readlink -f "${ours[$name]}")")
    case $name in
        libcudnn.so.*) extras+=("$dir"/libcudnn_*.so.*) ;;
        libnvrtc.so.*) extras+=("$dir"/libnvrtc-builtins*.so*) ;;
        *) ;;
    esac
done
for f in "${extras[@]}"; do
    [[ -e $f ]] || continue
    ours[$(basename "$f")]=$f
    resolve "$f"
done

if [[ ${#missing[@]} -gt 0 ]]; then
    printf 'collect-runtime-libs: not found: %s\n' "${missing[@]}" >&2
    echo "collect-runtime-libs: searched: $lib_path" >&2
    exit 1
fi

mkdir -p "$dest"
total=0
for name in $(printf '%s\n' "${!ours[@]}" | sort); do
    cp -L --preserve=mode "${ours[$name]}" "$dest/$name"
    size=$(stat -c %s "$dest/$name")
    total=$((total + size))
    printf 'copied  %-40s %6d MiB  %s\n' "$name" $((size / 1048576)) "${ours[$name]}"
done
for name in $(printf '%s\n' "${!system[@]}" | sort); do
    printf 'system  %-40s            %s\n' "$name" "${system[$name]}"
done
echo "collect-runtime-libs: ${#ours[@]} libraries, $((total / 1048576)) MiB in $dest;" \
     "${#system[@]} expected from the base image"
