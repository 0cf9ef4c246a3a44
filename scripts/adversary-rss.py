#!/usr/bin/env python3
"""Peak RSS of a sluice server under a hostile load, with a good client served beside it.

    .venv/bin/python scripts/adversary-rss.py [--seconds 30] [-- extra sluice flags]

Builds nothing: needs `make build` and `cargo build --release -p sluice --example
adversary`. Serves the bundled repository from the release binary with default flags
(plus any given after `--`), then runs the adversary example against it: stalled
maximum-size messages on many streams, complete maximum-size messages back to back,
and messages made of empty `inputs` entries, while a good client sends an mlp request
every 10 ms. Prints the example's JSON and a Markdown row with the RSS bound the
README's Security section documents:

    baseline RSS + max_request_bytes_in_flight + open connections x 2 MiB

(request memory, wire and decoded, is reserved from the budget; each connection's HTTP/2
windows and send buffer hold up to about 2 MiB more). Exits 1 if the server died or its
peak RSS went over the bound.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from sluice_serve import BIN, ROOT, start_server

ADVERSARY = ROOT / "target/release/examples/adversary"
MIB = 1 << 20


def free_port_block(n=3):
    """A port p with p, p+1, p+2 free (best effort)."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65535:
            ok = True
            for q in range(p, p + n):
                with socket.socket() as t:
                    # As the server's listeners do: ports left in TIME_WAIT by an
                    # earlier run's many connections are still usable.
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        t.bind(("127.0.0.1", q))
                    except OSError:
                        ok = False
            if ok:
                return p
    sys.exit("no free ports")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--baseline-seconds", type=int, default=5)
    ap.add_argument("--stallers", type=int, default=64)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--amplifiers", type=int, default=4)
    ap.add_argument("--max-message-bytes", type=int, default=64 * MIB)
    ap.add_argument("--budget-bytes", type=int, default=256 * MIB,
                    help="the server's max_request_bytes_in_flight (for the bound)")
    ap.add_argument("extra", nargs="*", help="flags passed to sluice")
    args = ap.parse_args()
    for binary in (BIN, ADVERSARY):
        if not binary.exists():
            sys.exit(f"{binary} is missing: make build; cargo build --release -p sluice --example adversary")

    port = free_port_block()
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        server = start_server(ROOT / "models", port, log, extra=args.extra)
        try:
            out = subprocess.run(
                [str(ADVERSARY), "--grpc", f"127.0.0.1:{port}", "--pid", str(server.pid),
                 "--seconds", str(args.seconds), "--baseline-seconds", str(args.baseline_seconds),
                 "--stallers", str(args.stallers), "--connections", str(args.connections),
                 "--senders", str(args.senders), "--amplifiers", str(args.amplifiers),
                 "--max-message-bytes", str(args.max_message_bytes)],
                check=True, capture_output=True, text=True, timeout=args.seconds + args.baseline_seconds + 120)
        finally:
            alive = server.poll() is None
            server.terminate()
            server.wait(timeout=60)
    report = json.loads(out.stdout)
    report["server_survived"] = alive
    print(json.dumps(report, indent=2))
    rss = report["rss_mib"]
    conns = args.connections + args.senders + args.amplifiers + 1
    bound = rss["baseline"] + args.budget_bytes / MIB + 2 * conns
    good_b, good_d = report["good_client"]["before"], report["good_client"]["during"]
    print()
    print("| baseline RSS | peak RSS under attack | VmHWM | documented bound | good client before: ok, p50, p99 | during: ok, failed, p50, p99 | server up |")
    print("| ---: | ---: | ---: | ---: | --- | --- | --- |")
    print(f"| {rss['baseline']:.0f} MiB | {rss['peak_under_attack']:.0f} MiB | {rss['vm_hwm']:.0f} MiB "
          f"| {bound:.0f} MiB | {good_b['ok']}, {good_b['p50_ms']:.2f} ms, {good_b['p99_ms']:.2f} ms "
          f"| {good_d['ok']}, {sum(good_d['failed'].values())}, {good_d['p50_ms']:.2f} ms, {good_d['p99_ms']:.2f} ms "
          f"| {'yes' if alive else 'NO'} |")
    if not alive or rss["vm_hwm"] > bound:
        sys.exit(1)


if __name__ == "__main__":
    main()
