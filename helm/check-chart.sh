#!/usr/bin/env bash
# Offline checks of the Helm chart in helm/sluice: strict lint, render with the default
# values and every helm/sluice/ci/*.yaml, strict Kubernetes schema validation, checkov,
# and negative tests that prove each gate rejects broken input. No cluster, no helm
# binary and no network are needed once the tools are installed.
#
#   bash helm/check-chart.sh [--keep-renders DIR]
#
# The tools live in <repo>/.venv-helm (created on first run, pinned versions below; a
# stamp file records them so later runs skip pip).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$repo_root/.venv-helm

# Pinned tool versions. helm-python-sdk embeds Helm's Go library (v4), so no helm binary.
pins=(
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
    "checkov==3.3.30"
)
stamp=$venv/.check-chart-stamp
want_stamp=$(printf '%s\n' "${pins[@]}")

if [[ ! -x $venv/bin/python ]] || [[ ! -f $stamp ]] || [[ $(cat "$stamp") != "$want_stamp" ]]; then
    echo "check-chart: installing ${pins[*]} into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    printf '%s\n' "$want_stamp" >"$stamp"
fi

keep=()
if [[ ${1:-} == "--keep-renders" ]]; then
    [[ -n ${2:-} ]] || { echo "usage: $0 [--keep-renders DIR]" >&2; exit 2; }
    keep=(--out "$2")
fi

exec "$venv/bin/python" "$repo_root/helm/check_chart.py" \
    --chart "$repo_root/helm/sluice" \
    --checkov "$venv/bin/checkov" \
    "${keep[@]}"
