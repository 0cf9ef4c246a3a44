"""Offline gate for the sluice Helm chart; run through helm/check-chart.sh.

Checks, for the default values and for every helm/sluice/ci/*.yaml:
  1. `helm lint --strict` (Helm's own library, through helm-python-sdk);
  2. rendering (values.schema.json is enforced by Helm while rendering);
  3. strict validation of every rendered object against the Kubernetes OpenAPI schemas
     (kubernetes-validate) for the oldest supported and the newest known Kubernetes;
     custom resources it has no schema for (ServiceMonitor, ScaledObject) are reported
     as skipped and checked against the chart's own partial schemas instead;
  4. chart invariants (termination grace above the server's drain, named ports, ...);
  5. checkov (framework kubernetes) over all renders: no failed check; accepted findings
     are skipped in the chart with a reason, and listed here;
  6. with --dockerfile, checkov (framework dockerfile) on the image's Dockerfile;
  7. with --sluice-binary, the real server started with each rendered sluice.toml
     (host, ports and repository overridden on the command line): it must accept the
     file, answer /v2/health/live, and exit 0 on SIGTERM within the pod's
     terminationGracePeriodSeconds. A file naming models in load_model runs against
     --bundled-models (the models the image bakes in) when they are exported there;
     otherwise load_model is overridden with "*" on an empty repository. When the pod
     gets SLUICE_MODEL_CONTROL_TOKEN from a Secret, the server gets a dummy one too.
The model-control token is also rendered from a plain value (chart-created Secret) and
checked to stay out of the ConfigMap. Then negative tests prove that each gate rejects
what it should.

Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import yaml
from kubernetes_validate import utils as kv

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema set.
KUBE_VERSIONS = ["1.27.0", kv.latest_version()]
RELEASE = "sluice"
NAMESPACE = "sluice"

# Custom resources that kubernetes-validate has no schema for, with the partial schemas
# this check applies instead (the fields the chart renders; unknown fields rejected).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name", "namespace", "labels"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
}
_SCALE_TARGET = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                   "name": {"type": "string"}},
}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object", "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "namespaceSelector": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"any": {"type": "boolean"},
                                       "matchNames": {"type": "array", "items": {"type": "string"}}}},
                    "selector": {"type": "object", "required": ["matchLabels"],
                                 "properties": {"matchLabels": _LABELS}},
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "required": ["port"], "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"}, "path": {"type": "string"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                                "relabelings": {"type": "array", "items": {"type": "object"}},
                                "metricRelabelings": {"type": "array", "items": {"type": "object"}},
                            }}},
                }},
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {}, "kind": {}, "metadata": _META,
            "spec": {
                "type": "object", "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": _SCALE_TARGET,
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {"type": "object", "additionalProperties": False, "properties": {
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"behavior": {"type": "object"}}}}},
                    "triggers": {
                        "type": "array", "minItems": 1,
                        "items": {"type": "object", "required": ["type", "metadata"],
                                  "properties": {"type": {"type": "string"},
                                                 "metadata": {"type": "object",
                                                              "additionalProperties": {"type": "string"}}}}},
                }},
        },
    },
}


class Report:
    """Collects PASS/FAIL/SKIP lines and the counts for the closing summary."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def ok(self, msg: str) -> None:
        self.passed += 1
        print(f"PASS  {msg}", flush=True)

    def fail(self, msg: str, detail: str = "") -> None:
        self.failed.append(msg)
        print(f"FAIL  {msg}", flush=True)
        for line in detail.strip().splitlines()[:40]:
            print(f"        {line[:400]}")

    def skip(self, msg: str) -> None:
        self.skipped.append(msg)
        print(f"SKIP  {msg}", flush=True)

    def section(self, title: str) -> None:
        print(f"\n== {title}", flush=True)


def load_values(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    return helm.values_from_yaml(path.read_text())


def render(chart_dir: Path, values: dict[str, Any] | None) -> dict[str, str]:
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests_of(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template, object) for every non-empty YAML document, NOTES.txt excluded."""
    out = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((template, doc))
    return out


def lint_errors(chart_dir: Path, values: dict[str, Any] | None) -> list[str]:
    """Findings of `helm lint --strict` at warning level or above."""
    result = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE,
                       kube_version="v" + KUBE_VERSIONS[0])
    return [f"{m['path']}: {m['error'].strip()}" for m in result["messages"] if m["severity"] >= 2]


def k8s_validate(obj: dict[str, Any]) -> tuple[str, str]:
    """('ok'|'fail'|'crd'|'unknown', detail) for one object, every KUBE_VERSION, strict."""
    kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
    for version in KUBE_VERSIONS:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            return "fail", f"k8s {e.version}: {path}: {e.message}"
        except kv.SchemaNotFoundError:
            schema = CRD_SCHEMAS.get((api, kind))
            if schema is None:
                return "unknown", f"no schema for {kind} {api}"
            try:
                jsonschema.validate(obj, schema)
            except jsonschema.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                return "fail", f"partial {kind} schema: {path}: {e.message}"
            return "crd", f"{kind} ({api})"
    return "ok", ""


def check_invariants(objs: list[dict[str, Any]]) -> list[str]:
    """Chart-level promises, checked on a render."""
    problems = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    deploys = [d for d in by_kind.get("Deployment", [])]
    cms = by_kind.get("ConfigMap", [])
    if len(deploys) != 1 or len(cms) != 1:
        return [f"expected 1 Deployment and 1 ConfigMap, got {len(deploys)} and {len(cms)}"]
    dep, cm = deploys[0], cms[0]
    conf = tomllib.loads(cm["data"]["sluice.toml"])
    pod = dep["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace <= conf["shutdown_grace_period_secs"]:
        problems.append(f"terminationGracePeriodSeconds {grace} is not above the server's "
                        f"shutdown_grace_period_secs {conf['shutdown_grace_period_secs']}")
    if conf.get("host") != "0.0.0.0":
        problems.append(f"sluice.toml host is {conf.get('host')!r}, must be 0.0.0.0 in a pod")
    main = next(c for c in pod["containers"] if c["name"] == "sluice")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    want = {"http": conf["http_port"], "grpc": conf["grpc_port"], "metrics": conf["metrics_port"]}
    if ports != want:
        problems.append(f"container ports {ports} do not match sluice.toml {want}")
    tls = any(e.get("name") == "SLUICE_TLS_CERT_FILE" for e in main.get("env", []))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe not in main:
            continue
        if tls:
            # The kubelet's gRPC probes speak no TLS: HTTP on the plain metrics port.
            if main[probe].get("httpGet", {}).get("port") != conf["metrics_port"]:
                problems.append(f"{probe} is not an HTTP probe on the metrics port (TLS)")
        elif main[probe].get("grpc", {}).get("port") != conf["grpc_port"]:
            problems.append(f"{probe} is not a gRPC probe on the gRPC port")
    if main.get("args") != ["--config", "/etc/sluice/sluice.toml"]:
        problems.append(f"unexpected args {main.get('args')}")
    if "checksum/config" not in dep["spec"]["template"]["metadata"].get("annotations", {}):
        problems.append("pod template lacks the checksum/config annotation")
    sc = main.get("securityContext", {})
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"] and sc.get("runAsNonRoot")):
        problems.append("sluice container securityContext is not restrictive")
    has_autoscaler = "HorizontalPodAutoscaler" in by_kind or "ScaledObject" in by_kind
    if has_autoscaler == ("replicas" in dep["spec"]):
        problems.append("Deployment must set replicas exactly when no autoscaler owns them")
    svc = next((s for s in by_kind.get("Service", []) if s["spec"].get("clusterIP") != "None"), None)
    if svc is None or not any(p.get("appProtocol") == "grpc" and p["name"] == "grpc"
                              for p in svc["spec"]["ports"]):
        problems.append("Service lacks a grpc port with appProtocol grpc")
    for sa in by_kind.get("ServiceAccount", []):
        if sa.get("automountServiceAccountToken") is not False:
            problems.append("ServiceAccount mounts its token")
    problems += token_problems(conf, main, by_kind.get("Secret", []))
    return problems


TOKEN_ENV = "SLUICE_MODEL_CONTROL_TOKEN"


def token_problems(conf: dict[str, Any], container: dict[str, Any],
                   secrets: list[dict[str, Any]]) -> list[str]:
    """The model-control token never goes into sluice.toml (a ConfigMap, readable by
    anyone who may read ConfigMaps); it reaches the server only as SLUICE_MODEL_CONTROL_TOKEN
    from a secretKeyRef, and a Secret the chart creates is the one that variable names."""
    problems = []
    if "model_control_token" in conf:
        problems.append("sluice.toml (a ConfigMap) contains model_control_token")
    envs = [e for e in container.get("env", []) if e.get("name") == TOKEN_ENV]
    if len(envs) > 1:
        problems.append(f"{TOKEN_ENV} is set {len(envs)} times")
    ref = None
    for e in envs:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if "value" in e or not ref or not ref.get("name") or not ref.get("key"):
            problems.append(f"{TOKEN_ENV} must come from a secretKeyRef, not {e}")
    for sec in secrets:
        data = sec.get("data", {})
        if ref is None or sec["metadata"]["name"] != ref.get("name") or ref.get("key") not in data:
            problems.append(f"Secret {sec['metadata']['name']} (keys {sorted(data)}) is not the "
                            f"one {TOKEN_ENV} reads ({ref})")
    return problems


def server_config_keys(config_rs: Path) -> set[str]:
    """TOML keys the server accepts: the fields of `struct Settings` in config/settings.rs that
    serde reads (the server rejects unknown keys, so the chart must render only these)."""
    text = config_rs.read_text()
    body = text[text.index("pub struct Settings"):]
    body = body[:body.index("\n}\n")]
    keys, skip_next = set(), False
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("#[serde(skip"):
            skip_next = True
        elif line.startswith("pub ") and ":" in line:
            if not skip_next:
                keys.add(line[4:line.index(":")].strip())
            skip_next = False
    return keys


def unknown_toml_keys(toml_text: str, known: set[str]) -> list[str]:
    unknown = set(tomllib.loads(toml_text)) - known
    if not unknown:
        return []
    return [f"sluice.toml has keys the server rejects: {sorted(unknown)} "
            f"(server settings: {sorted(known)})"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exported_models(repository: Path | None, names: list[str]) -> bool:
    """True when every named model is in `repository` with a config.pbtxt and a model.pt
    (the bundled models' model.pt files are built by models/export.py, not committed)."""
    if repository is None:
        return False
    return all((repository / n / "config.pbtxt").is_file()
               and any((repository / n).glob("*/model.pt")) for n in names)


def serve_with_config(binary: Path, toml_text: str, grace_s: int, work: Path,
                      repository: Path | None = None, extra_args: list[str] | None = None,
                      extra_env: dict[str, str] | None = None) -> list[str]:
    """Start sluice with a rendered sluice.toml; [] when it served and stopped cleanly.
    The model repository is an empty folder unless `repository` is given."""
    conf = work / "sluice.toml"
    conf.write_text(toml_text)
    repo = repository
    if repo is None:
        repo = work / "empty-repository"
        repo.mkdir(exist_ok=True)
    http = free_port()
    cmd = [str(binary), "--config", str(conf), "--host", "127.0.0.1",
           "--model-repository", str(repo), "--http-port", str(http),
           "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
           *(extra_args or [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update(extra_env or {})
    log = work / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        status, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and status != 200:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live",
                                            timeout=2) as r:
                    status = r.status
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        if status != 200:
            return [f"server did not answer /v2/health/live (exit {proc.poll()}): "
                    + log.read_text()[-1500:]]
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            return [f"server still running {grace_s} s after SIGTERM "
                    "(the pod's terminationGracePeriodSeconds)"]
        return [] if rc == 0 else [f"server exited {rc} after SIGTERM: {log.read_text()[-800:]}"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def write_render(dest: Path, objs: list[tuple[str, dict[str, Any]]]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("---\n".join(yaml.safe_dump(o, sort_keys=False) for _, o in objs))


def run_checkov(checkov: str, target: Path, framework: str = "kubernetes"
                ) -> tuple[int, dict[str, Any] | None, str]:
    """Run checkov on a folder or file; (exit code, JSON report, stderr)."""
    where = ["--directory" if target.is_dir() else "--file", str(target)]
    proc = subprocess.run(
        [checkov, *where, "--framework", framework, "--output", "json",
         "--compact", "--skip-download"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    try:
        data = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        return proc.returncode, None, proc.stdout[-2000:] + proc.stderr[-2000:]
    if isinstance(data, list):  # one report per framework
        data = next((d for d in data if d.get("check_type") == framework), data[0])
    return proc.returncode, data, proc.stderr[-2000:]


def expect_failure(report: Report, name: str, action: Callable[[], Any],
                   must_contain: str) -> None:
    """A negative test: `action` must raise (or return problems) mentioning `must_contain`."""
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - any rejection counts; the message is checked
        message = str(e)
    else:
        if not result:
            report.fail(f"negative: {name}: was ACCEPTED, must be rejected")
            return
        message = "\n".join(result) if isinstance(result, list) else str(result)
    if must_contain.lower() in message.lower():
        first = message.strip().splitlines()[-1] if message.strip() else message
        report.ok(f"negative: {name}: rejected as intended ({first.strip()[:150]})")
    else:
        report.fail(f"negative: {name}: rejected, but not for the expected reason "
                    f"(wanted {must_contain!r})", message)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chart", type=Path, required=True)
    ap.add_argument("--checkov", required=True, help="path of the checkov executable")
    ap.add_argument("--dockerfile", type=Path, help="also run checkov on this Dockerfile")
    ap.add_argument("--server-config", type=Path,
                    help="server/src/config/settings.rs: rendered sluice.toml keys must be among its settings")
    ap.add_argument("--sluice-binary", type=Path,
                    help="start this sluice binary with every rendered sluice.toml")
    ap.add_argument("--bundled-models", type=Path,
                    help="the models the image bakes in (<repo>/models): the server runs "
                         "against them when a rendered sluice.toml names models in load_model")
    ap.add_argument("--out", type=Path, help="keep the renders here (default: a temp folder)")
    args = ap.parse_args()

    chart_dir: Path = args.chart.resolve()
    report = Report()
    work = Path(tempfile.mkdtemp(prefix="sluice-chart-"))
    out = args.out.resolve() if args.out else work / "renders"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    print(f"helm SDK {helm.helm_sdk_version()} (helm-c {helm.helm_c_version()}), "
          f"kubernetes-validate schemas {', '.join(KUBE_VERSIONS)}")

    cases: list[tuple[str, Path | None]] = [("default", None)]
    cases += [(p.stem, p) for p in sorted((chart_dir / "ci").glob("*.yaml"))]

    binary: Path | None = None
    if args.sluice_binary and os.access(args.sluice_binary, os.X_OK):
        binary = args.sluice_binary.resolve()
        print(f"server binary: {binary}")
    else:
        report.skip("server start with the rendered sluice.toml: no sluice binary "
                    "(build it with: cargo build --release -p sluice)")

    bundled: Path | None = None
    if args.bundled_models and args.bundled_models.is_dir():
        bundled = args.bundled_models.resolve()

    crd_kinds_seen: set[str] = set()
    known_keys: set[str] | None = None
    if args.server_config and args.server_config.is_file():
        known_keys = server_config_keys(args.server_config)
    elif args.server_config:
        report.skip(f"sluice.toml keys not cross-checked: {args.server_config} not found")
    for case, values_file in cases:
        report.section(f"values: {case}" + (f" ({values_file.relative_to(chart_dir)})"
                                             if values_file else ""))
        try:
            values = load_values(values_file)
        except helm.HelmError as e:
            report.fail(f"{case}: values file does not parse", str(e))
            continue

        errors = lint_errors(chart_dir, values)
        if errors:
            report.fail(f"{case}: helm lint --strict", "\n".join(errors))
        else:
            report.ok(f"{case}: helm lint --strict")

        try:
            objs = manifests_of(render(chart_dir, values))
        except helm.HelmError as e:
            report.fail(f"{case}: render", str(e))
            continue
        kinds = sorted({o["kind"] for _, o in objs})
        report.ok(f"{case}: rendered {len(objs)} objects ({', '.join(kinds)})")
        write_render(out / case / "manifests.yaml", objs)

        bad, crd = [], []
        for template, obj in objs:
            status, detail = k8s_validate(obj)
            label = f"{obj['kind']}/{obj['metadata']['name']} ({template})"
            if status == "fail":
                bad.append(f"{label}: {detail}")
            elif status == "unknown":
                bad.append(f"{label}: {detail}; not an expected custom resource")
            elif status == "crd":
                crd.append(detail)
                crd_kinds_seen.add(obj["kind"])
        if bad:
            report.fail(f"{case}: kubernetes schema validation (strict)", "\n".join(bad))
        else:
            report.ok(f"{case}: {len(objs) - len(crd)} objects valid against the Kubernetes "
                      f"{' and '.join(KUBE_VERSIONS)} schemas (strict)")
        for c in crd:
            report.skip(f"{case}: {c}: no Kubernetes schema for this custom resource; "
                        "checked against the chart's partial schema only (passed)")

        problems = check_invariants([o for _, o in objs])
        if known_keys is not None:
            cm = next(o for _, o in objs if o["kind"] == "ConfigMap")
            problems += unknown_toml_keys(cm["data"]["sluice.toml"], known_keys)
        if problems:
            report.fail(f"{case}: chart invariants", "\n".join(problems))
        else:
            report.ok(f"{case}: chart invariants (sluice.toml keys known to the server, "
                      "grace > drain, ports, probes, checksum, security context, replicas vs "
                      "autoscaler)")

        if binary is not None:
            cm = next(o for _, o in objs if o["kind"] == "ConfigMap")
            dep = next(o for _, o in objs if o["kind"] == "Deployment")
            grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            toml_text = cm["data"]["sluice.toml"]
            names = [n for n in tomllib.loads(toml_text).get("load_model", []) if n != "*"]
            repository, extra_args, how = None, [], ""
            if names and exported_models(bundled, names):
                repository, how = bundled, f", loading {', '.join(names)} from {bundled}"
            elif names:
                extra_args = ["--load-model", "*"]
                how = (f"; load_model {names} overridden with \"*\" on an empty repository "
                       "(bundled models not exported: python models/export.py)")
            env_names = {e["name"] for c in dep["spec"]["template"]["spec"]["containers"]
                         for e in c.get("env", [])}
            extra_env = {TOKEN_ENV: "check-chart-dummy-token"} if TOKEN_ENV in env_names else {}
            if extra_env:
                how += f", with {TOKEN_ENV} set"
            problems = serve_with_config(binary, toml_text, grace, work, repository,
                                         extra_args, extra_env)
            if problems:
                report.fail(f"{case}: sluice accepts the rendered sluice.toml", "\n".join(problems))
            else:
                report.ok(f"{case}: {binary.name} started with the rendered sluice.toml{how}, "
                          f"answered /v2/health/live, exited 0 on SIGTERM within {grace} s")

    report.section("checkov (framework kubernetes), every render")
    rc, data, err = run_checkov(args.checkov, out)
    if data is None:
        report.fail(f"checkov produced no report (exit {rc})", err)
    else:
        summary = data.get("summary", {})
        results = data.get("results", {})
        failed = results.get("failed_checks", [])
        skipped = results.get("skipped_checks", [])
        if failed or rc != 0:
            report.fail(f"checkov: {summary.get('failed', len(failed))} failed checks", "\n".join(
                f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
                for c in failed))
        else:
            report.ok(f"checkov: {summary.get('passed')} passed, 0 failed, "
                      f"{summary.get('skipped')} skipped with a reason in the chart")
        accepted: dict[str, set[str]] = {}
        for c in skipped:
            accepted.setdefault(c["check_id"], set()).add(
                c.get("check_result", {}).get("suppress_comment", "").strip())
        for check_id in sorted(accepted):
            for reason in sorted(accepted[check_id]):
                print(f"      skipped {check_id}: {reason}")

    if args.dockerfile:
        report.section(f"checkov (framework dockerfile), {args.dockerfile.name}")
        rc, data, err = run_checkov(args.checkov, args.dockerfile.resolve(), "dockerfile")
        failed = (data or {}).get("results", {}).get("failed_checks", [])
        if data is None or rc != 0 or failed:
            report.fail(f"checkov dockerfile: exit {rc}", err + "\n".join(
                f"{c['check_id']} {c['check_name']} (line {c['file_line_range']})" for c in failed))
        else:
            s = data.get("summary", {})
            report.ok(f"checkov dockerfile: {s.get('passed')} passed, 0 failed, "
                      f"{s.get('skipped')} skipped")

    # ------------------------------------------- model-control token from a plain value
    report.section("model-control token from server.modelControlToken.value (chart-created Secret)")
    token = "check-chart-plain-token-4f9c2e"
    token_values = {"server": {"modelControlMode": "explicit", "loadModels": ["*"],
                               "modelControlToken": {"value": token, "key": "bearer.token"}}}
    try:
        rendered = render(chart_dir, token_values)
    except helm.HelmError as e:
        report.fail("token value: render", str(e))
    else:
        objs = [o for _, o in manifests_of(rendered)]
        secrets = [o for o in objs if o["kind"] == "Secret"]
        problems = lint_errors(chart_dir, token_values)
        if len(secrets) != 1:
            problems.append(f"expected 1 Secret, got {len(secrets)}")
        elif base64.b64decode(secrets[0].get("data", {}).get("bearer.token", "")).decode() != token:
            problems.append("the Secret does not hold the token under the configured key")
        encoded = base64.b64encode(token.encode()).decode()
        for template, text in rendered.items():
            if token in text or (encoded in text and not template.endswith("secret.yaml")):
                problems.append(f"{template} contains the token")
        for o in objs:
            status, detail = k8s_validate(o)
            if status != "ok":
                problems.append(f"{o['kind']}/{o['metadata']['name']}: {detail}")
        problems += check_invariants(objs)
        if problems:
            report.fail("token value: Secret, env and ConfigMap", "\n".join(problems))
        else:
            report.ok("token value: lint, strict schemas, one Secret with the token under its "
                      f"key, {TOKEN_ENV} from its secretKeyRef, the token in no other object "
                      "and not in NOTES")

    # ---------------------------------------------------------------- negative tests
    report.section("negative tests: each gate must reject a broken input")

    def bad_values(values: dict[str, Any]) -> Callable[[], Any]:
        return lambda: render(chart_dir, values)

    bad_file = work / "wrong-type-values.yaml"
    bad_file.write_text('replicaCount: "two"\n')
    expect_failure(report, "values file with replicaCount: \"two\" (schema)",
                   bad_values(load_values(bad_file) or {}), "want integer")
    expect_failure(report, "service.grpcPort: \"x\" (schema)",
                   bad_values({"service": {"grpcPort": "x"}}), "want integer")
    expect_failure(report, "server.logFormat: xml (schema enum)",
                   bad_values({"server": {"logFormat": "xml"}}), "logFormat")
    expect_failure(report, "unknown top-level key replicas (schema additionalProperties)",
                   bad_values({"replicas": 2}), "additional properties")
    expect_failure(report, "lint --strict on replicaCount: \"two\"",
                   lambda: lint_errors(chart_dir, {"replicaCount": "two"}), "want integer")
    expect_failure(report, "HPA and KEDA both enabled (fail in template)",
                   bad_values({"autoscaling": {"hpa": {"enabled": True},
                                               "keda": {"enabled": True}}}),
                   "enable one of them")
    expect_failure(report, "server.loadModels with modelControlMode none (fail in template; "
                   "the server refuses load_model in mode none)",
                   bad_values({"server": {"modelControlMode": "none", "loadModels": ["mlp"]}}),
                   "modelControlMode is none")
    expect_failure(report, "modelControlToken with existingSecret and value (fail in template)",
                   bad_values({"server": {"modelControlMode": "explicit", "modelControlToken": {
                       "existingSecret": "sluice-model-control", "value": "s3cret"}}}),
                   "set only one of existingSecret")
    expect_failure(report, "modelControlMode explicit without a token or the opt-in (fail in "
                   "template; the server refuses to start the same way)",
                   bad_values({"server": {"modelControlMode": "explicit"}}),
                   "allowUnauthenticatedModelControl")
    expect_failure(report, "server.allowUnauthenticatedModelControl: \"yes\" (schema)",
                   bad_values({"server": {"allowUnauthenticatedModelControl": "yes"}}),
                   "allowUnauthenticatedModelControl")
    expect_failure(report, "server.maxModelInstances: 0 (schema)",
                   bad_values({"server": {"maxModelInstances": 0}}), "maxModelInstances")
    expect_failure(report, "server.edge.maxConnections: 0 (schema)",
                   bad_values({"server": {"edge": {"maxConnections": 0}}}), "maxConnections")
    expect_failure(report, "server.edge.bodyReadTimeoutSeconds: \"15s\" (schema type)",
                   bad_values({"server": {"edge": {"bodyReadTimeoutSeconds": "15s"}}}),
                   "bodyReadTimeoutSeconds")
    expect_failure(report, "server.edge.maxRequestBytesInFlight below maxMessageBytes (fail in "
                   "template; the server refuses to start the same way)",
                   bad_values({"server": {"maxMessageBytes": 67108864,
                                          "edge": {"maxRequestBytesInFlight": 1048576}}}),
                   "maxRequestBytesInFlight")
    expect_failure(report, "server.loadModels with modelControlMode poll (fail in template; "
                   "the server refuses load_model in mode poll)",
                   bad_values({"server": {"modelControlMode": "poll", "loadModels": ["mlp"]}}),
                   "modelControlMode is poll")
    expect_failure(report, "server.repositoryPollSeconds: 0 (schema)",
                   bad_values({"server": {"modelControlMode": "poll",
                                          "repositoryPollSeconds": 0}}),
                   "repositoryPollSeconds")
    expect_failure(report, "server.modelControlMode: auto (schema enum)",
                   bad_values({"server": {"modelControlMode": "auto"}}), "modelControlMode")
    expect_failure(report, "server.idleTimeoutSeconds: 0 (schema, must be positive)",
                   bad_values({"server": {"idleTimeoutSeconds": 0}}), "idleTimeoutSeconds")
    expect_failure(report, "server.minInstances: -1 (schema)",
                   bad_values({"server": {"minInstances": -1}}), "minInstances")
    expect_failure(report, "server.modelControlToken.secret (schema additionalProperties)",
                   bad_values({"server": {"modelControlToken": {"secret": "x"}}}),
                   "additional properties")

    broken = work / "broken-chart"
    shutil.copytree(chart_dir, broken / "sluice")
    dep = broken / "sluice" / "templates" / "deployment.yaml"
    dep.write_text(dep.read_text().replace("{{- with .Values.nodeSelector }}",
                                           "{{- with .Values.nodeSelector }\n", 1))
    expect_failure(report, "template with a syntax error (render)",
                   lambda: render(broken / "sluice", None), "deployment.yaml")
    expect_failure(report, "template with a syntax error (lint --strict)",
                   lambda: lint_errors(broken / "sluice", None), "deployment.yaml")
    svc = broken / "sluice" / "templates" / "service.yaml"
    dep.write_text((chart_dir / "templates" / "deployment.yaml").read_text())
    svc.write_text(svc.read_text() + "\n  clusterIP: {{ .Values.service.typo.clusterIP }}\n")
    expect_failure(report, "template reading a missing value (render)",
                   lambda: render(broken / "sluice", None), "nil pointer")

    default_objs = [o for _, o in manifests_of(render(chart_dir, None))]
    deployment = next(o for o in default_objs if o["kind"] == "Deployment")

    def with_change(kind: str, change: Callable[[dict[str, Any]], None]) -> Callable[[], Any]:
        """Chart invariants of the default render with one object of `kind` changed."""
        def run() -> Any:
            objs = copy.deepcopy(default_objs)
            change(next(o for o in objs if o["kind"] == kind))
            return check_invariants(objs)
        return run

    def token_in_configmap(cm: dict[str, Any]) -> None:
        cm["data"]["sluice.toml"] += 'model_control_token = "s3cret"\n'
    expect_failure(report, "model_control_token in the ConfigMap (invariant)",
                   with_change("ConfigMap", token_in_configmap), "contains model_control_token")

    def literal_token_env(dep: dict[str, Any]) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": TOKEN_ENV, "value": "s3cret"})
    expect_failure(report, f"{TOKEN_ENV} as a literal env value (invariant)",
                   with_change("Deployment", literal_token_env), "must come from a secretKeyRef")

    def mutated(change: Callable[[dict[str, Any]], None]) -> Callable[[], Any]:
        def run() -> Any:
            obj = copy.deepcopy(deployment)
            change(obj)
            status, detail = k8s_validate(obj)
            if status != "fail":
                return None
            raise ValueError(detail)
        return run

    expect_failure(report, "Deployment with an unknown container field (strict k8s schema)",
                   mutated(lambda d: d["spec"]["template"]["spec"]["containers"][0]
                           .__setitem__("gpuCount", 1)),
                   "additional properties")
    expect_failure(report, "Deployment with replicas: \"one\" (k8s schema type)",
                   mutated(lambda d: d["spec"].__setitem__("replicas", "one")), "replicas")
    expect_failure(report, "Deployment probe with a named gRPC port (k8s schema type)",
                   mutated(lambda d: d["spec"]["template"]["spec"]["containers"][0]
                           ["livenessProbe"]["grpc"].__setitem__("port", "grpc")), "port")

    if known_keys is not None:
        expect_failure(report, "sluice.toml with a key the server does not know",
                       lambda: unknown_toml_keys('grpc_port = 8001\nmax_batch = 8\n', known_keys),
                       "max_batch")

    if binary is not None:
        def bad_toml() -> Any:
            d = work / "bad-toml"
            d.mkdir(exist_ok=True)
            return serve_with_config(binary, 'http_port = 8000\nmax_batch = 8\n', 10, d)
        expect_failure(report, "the server itself refuses a sluice.toml with an unknown key",
                       bad_toml, "unknown field")

        def load_model_in_mode_none() -> Any:
            d = work / "bad-load-model"
            d.mkdir(exist_ok=True)
            return serve_with_config(binary, 'model_control_mode = "none"\nload_model = ["mlp"]\n',
                                     10, d)
        expect_failure(report, "the server itself refuses load_model with model_control_mode none "
                       "(what the chart's fail mirrors)", load_model_in_mode_none,
                       "needs model_control_mode explicit")

        def explicit_without_token() -> Any:
            d = work / "bad-explicit"
            d.mkdir(exist_ok=True)
            return serve_with_config(binary, 'model_control_mode = "explicit"\n', 10, d)
        expect_failure(report, "the server itself refuses model_control_mode explicit without a "
                       "token or the opt-in (what the chart's fail mirrors)",
                       explicit_without_token, "allow_unauthenticated_model_control")

    def unknown_kind() -> Any:
        status, detail = k8s_validate({"apiVersion": "example.com/v1", "kind": "Gadget",
                                       "metadata": {"name": "x"}})
        return None if status in ("ok", "crd") else [detail]
    expect_failure(report, "an unexpected kind without schema is not silently skipped",
                   unknown_kind, "no schema")

    def insecure_checkov() -> Any:
        d = copy.deepcopy(deployment)
        d["metadata"].pop("annotations", None)  # no accepted findings either
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["securityContext"]["privileged"] = True
        c["securityContext"]["allowPrivilegeEscalation"] = True
        bad_dir = work / "checkov-negative"
        bad_dir.mkdir()
        (bad_dir / "deployment.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
        rc, data, err = run_checkov(args.checkov, bad_dir)
        ids = sorted({c["check_id"] for c in (data or {}).get("results", {})
                      .get("failed_checks", [])})
        return [f"checkov exit {rc}, failed: {' '.join(ids)}"] if rc != 0 and ids else None
    expect_failure(report, "privileged Deployment without skips (checkov)", insecure_checkov,
                   "CKV_K8S_16")

    def token_env_without_skip() -> Any:
        objs = [o for _, o in manifests_of(render(chart_dir, token_values))]
        d = next(o for o in objs if o["kind"] == "Deployment")
        notes = d["metadata"].get("annotations", {})
        for k in [k for k, v in notes.items() if v.startswith("CKV_K8S_35=")]:
            del notes[k]
        bad_dir = work / "checkov-token-negative"
        bad_dir.mkdir()
        (bad_dir / "deployment.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
        rc, data, err = run_checkov(args.checkov, bad_dir)
        ids = sorted({c["check_id"] for c in (data or {}).get("results", {})
                      .get("failed_checks", [])})
        return [f"checkov exit {rc}, failed: {' '.join(ids)}"] if rc != 0 and ids else None
    expect_failure(report, "the token env var without its CKV_K8S_35 skip (checkov: the skip "
                   "covers a real finding)", token_env_without_skip, "CKV_K8S_35")

    shutil.rmtree(work, ignore_errors=True)

    # ---------------------------------------------------------------- summary
    print("\n== summary")
    if crd_kinds_seen:
        print("custom resources without a Kubernetes schema (partial chart-side schema "
              f"only): {', '.join(sorted(crd_kinds_seen))}")
    for f in report.failed:
        print(f"failed: {f}")
    if args.out:
        print(f"renders kept in {out}")
    print(f"check-chart: {report.passed} passed, {len(report.failed)} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
