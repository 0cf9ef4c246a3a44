#!/usr/bin/env bash
# Offline checks of the Helm chart in helm/sluice: strict lint, render with the default
# values and every helm/sluice/ci/*.yaml, strict Kubernetes schema validation, checkov,
# and negative tests that prove each gate rejects broken input. No cluster, no helm
# binary and no network are needed once the tools are installed. The image's Dockerfile
# gets a checkov pass too (there is no Docker engine to build it here).
#
#   bash helm/check-chart.sh [--keep-renders DIR]
#
# The tools live in <repo>/.venv-helm, installed on first run from
# helm/requirements-check.txt; a stamp file keyed on that file's hash makes later runs
# skip pip until the pins change.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$repo_root/.venv-helm

# Pinned tools: helm-python-sdk (Helm's Go library v4, so no helm binary),
# kubernetes-validate (offline Kubernetes schemas), checkov; every dependency pinned too.
requirements=$repo_root/helm/requirements-check.txt
stamp=$venv/.check-chart-stamp
want_stamp=$(sha256sum "$requirements" | cut -d' ' -f1)

if [[ ! -x $venv/bin/python ]] || [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "$want_stamp" ]]; then
    echo "check-chart: installing $(grep -cv '^#' "$requirements") pinned packages from helm/requirements-check.txt into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    echo "$want_stamp" >"$stamp"
fi

keep=()
if [[ ${1:-} == "--keep-renders" ]]; then
    [[ -n ${2:-} ]] || { echo "usage: $0 [--keep-renders DIR]" >&2; exit 2; }
    keep=(--out "$2")
fi

# The real server, when built, checks that it accepts the rendered sluice.toml:
# $SLUICE_BIN if set, else the newer of the release and debug builds.
binary=()
if [[ -n ${SLUICE_BIN:-} ]]; then
    binary=(--sluice-binary "$SLUICE_BIN")
else
    newest=$(ls -t "$repo_root/target/release/sluice" "$repo_root/target/debug/sluice" 2>/dev/null | head -n 1 || true)
    [[ -n $newest ]] && binary=(--sluice-binary "$newest")
fi

exec "$venv/bin/python" "$repo_root/helm/check_chart.py" \
    --chart "$repo_root/helm/sluice" \
    --checkov "$venv/bin/checkov" \
    --dockerfile "$repo_root/Dockerfile" \
    --server-config "$repo_root/server/src/config/settings.rs" \
    --bundled-models "$repo_root/models" \
    "${binary[@]}" "${keep[@]}"
