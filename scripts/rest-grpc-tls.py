#!/usr/bin/env python3
"""REST against gRPC, plain against TLS: throughput and CPU per inference of one model,
measured with Triton's perf_analyzer (`-i grpc` and `-i http`) in one run.

    .venv/bin/python scripts/rest-grpc-tls.py [--model mlp] [--rate 1000] \\
        [--concurrency 8] [--rounds 3]

Each round serves the bundled repository from the release binary twice, with default
flags: plain TCP, then TLS with a self-signed certificate made for the run (the order
alternates between rounds). On each server, for each protocol, perf_analyzer runs

- closed loop at `--concurrency` clients: throughput (inferences/s, perf_analyzer's);
- open loop at `--rate` requests/s: the server process's utime + stime from /proc over
  the run, divided by the inferences it counted over the same run
  (`sluice_inferences_total` on the plain metrics port): CPU per inference.

perf_analyzer exits non-zero on any failed request, which stops the script. Prints every
round, then medians and the ratios to gRPC over plain TCP. Needs `make build`;
perf_analyzer is run by PERF_ANALYZER (default scripts/tools/perf-analyzer, which
installs it on first use); the certificate needs the `cryptography` package (in
requirements.txt). Linux only; loopback only.
"""

import argparse
import csv
import datetime
import ipaddress
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from sluice_serve import BIN, ROOT, start_server, tree_cpu_seconds

PORT = 39661
PA = os.environ.get("PERF_ANALYZER", str(ROOT / "scripts/tools/perf-analyzer"))


def self_signed(work):
    """A key and a self-signed certificate for 127.0.0.1, as PEM files in `work`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (work / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (work / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return work / "tls.crt", work / "tls.key"


def start(work, tls):
    extra = ["--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])] if tls else []
    return start_server(ROOT / "models", PORT, (work / "server.log").open("a"), extra)


def inferences(model):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT + 2}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sluice_inferences_total{") and f'model="{model}"' in line)


def perf_analyzer(args, work, protocol, tls, load):
    """Run perf_analyzer; its Inferences/Second column from the CSV report."""
    port = PORT if protocol == "grpc" else PORT + 1
    out = work / "pa.csv"
    cmd = [PA, "-m", args.model, "-u", f"127.0.0.1:{port}", "-i", protocol,
           "--measurement-interval", str(args.interval_ms), "-f", str(out),
           # A shared machine's noise is not a failure: accept any spread between windows
           # (failed requests still fail the run).
           "--stability-percentage", "100", "--max-trials", "4", *load]
    if tls and protocol == "grpc":
        cmd += ["--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", str(tls[0])]
    elif tls:
        cmd = [c.replace(f"127.0.0.1:{port}", f"https://127.0.0.1:{port}") for c in cmd]
        cmd += ["--ssl-https-verify-peer", "1", "--ssl-https-verify-host", "2",
                "--ssl-https-ca-certificates-file", str(tls[0])]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        sys.exit(f"perf_analyzer failed ({protocol}, tls={bool(tls)}):\n{run.stdout[-1500:]}\n{run.stderr[-800:]}")
    rows = list(csv.DictReader(out.open()))
    return float(rows[0]["Inferences/Second"])


def measure(args, work, proc, protocol, tls):
    throughput = perf_analyzer(args, work, protocol, tls, ["--concurrency-range", str(args.concurrency)])
    cpu0, n0 = tree_cpu_seconds(proc.pid), inferences(args.model)
    perf_analyzer(args, work, protocol, tls, ["--request-rate-range", str(args.rate)])
    cpu1, n1 = tree_cpu_seconds(proc.pid), inferences(args.model)
    return {"throughput": throughput, "cpu_us": 1e6 * (cpu1 - cpu0) / max(n1 - n0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--rate", type=int, default=1000, help="open-loop requests/s for CPU per inference")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop clients for throughput")
    ap.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer's measurement interval")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: make build")
    work = Path(tempfile.mkdtemp(prefix="sluice-rest-grpc-tls-"))
    cert = self_signed(work)
    results = {}
    for r in range(args.rounds):
        order = [None, cert] if r % 2 == 0 else [cert, None]
        for tls in order:
            proc = start(work, tls)
            try:
                for protocol in ("grpc", "http"):
                    key = (protocol, "TLS" if tls else "plain TCP")
                    m = measure(args, work, proc, protocol, tls)
                    results.setdefault(key, []).append(m)
                    print(f"round {r + 1}: {key[0]} {key[1]}: {m['throughput']:.0f} inferences/s at "
                          f"c={args.concurrency}, {m['cpu_us']:.0f} us CPU per inference at {args.rate}/s",
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    base = {k: statistics.median(m[k] for m in results[("grpc", "plain TCP")]) for k in ("throughput", "cpu_us")}
    print(f"\n| {args.model} | throughput at c={args.concurrency} | vs gRPC plain "
          f"| CPU per inference at {args.rate}/s | vs gRPC plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, ms in results.items():
        t = statistics.median(m["throughput"] for m in ms)
        c = statistics.median(m["cpu_us"] for m in ms)
        print(f"| {key[0]} over {key[1]} | {t:.0f}/s | {t / base['throughput']:.2f}x "
              f"| {c:.0f} us | {c / base['cpu_us']:.2f}x |")


if __name__ == "__main__":
    main()
