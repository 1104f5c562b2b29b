"""Every packaging template parses, and names the metrics, paths and keys we really have."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kotlin_smtp_py.config import Config, LifecycleConfig, load_text
from kotlin_smtp_py.metrics import HISTOGRAM_NAMES, METRIC_NAMES, Metrics
from kotlin_smtp_py.status import DeliveryStatus, Reason
from kotlin_smtp_py.web.health import Readiness
from kotlin_smtp_py.web.site import _Endpoints, build_routes

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
YAML_FILES = sorted([*PACKAGING.glob("*.yml"), *PACKAGING.glob("*.yaml")])
# Labels Prometheus adds to every scraped series, plus the environment label the rules select on.
TARGET_LABELS = {"job", "instance", "environment", "le"}
GRACE_SECONDS = LifecycleConfig().gracefulShutdownTimeoutMs / 1000


def exported_labels() -> dict[str, set[str]]:
    """Metric name (as written in PromQL, histogram series included) -> its label names."""
    m = Metrics()
    m.delivery_result("x.test", DeliveryStatus.permanent_failure(Reason.DNS, "x"))
    out: dict[str, set[str]] = {}
    for line in m.render().decode().splitlines():
        if line.startswith("#"):
            continue
        name, _, labels = line.split(" ")[0].partition("{")
        out.setdefault(name, set()).update(re.findall(r'(\w+)="', labels))
    return out


def test_expected_files_exist() -> None:
    for name in ("systemd/kotlin-smtp.service", "systemd/kotlin-smtp.socket",
                 "docker-compose.smtp.yml", "Dockerfile", "k8s-probes.yaml",
                 "k8s-deployment.smtp.yaml", "k8s-service.smtp.yaml", "k8s-pdb.smtp.yaml",
                 "prometheus-smtp-alerts.yml", "grafana-dashboard.json"):
        assert (PACKAGING / name).is_file(), name


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, path


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names) for every metric-looking identifier in a PromQL expression."""
    found = []
    for m in re.finditer(r"\b([a-z_][a-z0-9_]*)\s*(\{[^}]*\})?", expr):
        name, selector = m.group(1), m.group(2) or ""
        if name.startswith("smtp_") or name == "up":
            found.append((name, set(re.findall(r"(\w+)\s*[!=]~?", selector))))
    return found


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PACKAGING / "prometheus-smtp-alerts.yml").read_text())
    exprs = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["labels"]["severity"] in ("info", "warning", "critical")
            exprs.append(rule["expr"])
    return exprs


def dashboard_exprs() -> list[str]:
    dash = json.loads((PACKAGING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    return exprs


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_named_is_exported(source: str) -> None:
    exprs = alert_exprs() if source == "alerts" else dashboard_exprs()
    labels = exported_labels()
    used: set[str] = set()
    for expr in exprs:
        for name, selector_labels in promql_selectors(expr):
            if name == "up":
                assert source == "alerts"  # the only non-SMTP metric, for the availability SLO
                continue
            assert name in labels, f"{name} in {expr!r} is not exported"
            assert selector_labels <= labels[name] | TARGET_LABELS, (name, selector_labels)
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRIC_NAMES
            used.add(base)
    if source == "dashboard":
        assert used == set(METRIC_NAMES)  # the dashboard shows every metric
    else:
        # the runbook's alert candidates
        assert {"smtp_spool_pending", "smtp_spool_dropped_total", "smtp_spool_retry_delay_seconds",
                "smtp_spool_retry_scheduled_total", "smtp_spool_queue_age_seconds",
                "smtp_spool_delivery_failure_total"} <= used
    assert HISTOGRAM_NAMES <= set(METRIC_NAMES)


def test_runbook_thresholds_are_rules() -> None:
    text = " ".join(alert_exprs())
    for fragment in ("smtp_spool_pending{environment!~\"dev|staging\"} > 1000",
                     "smtp_spool_pending{environment!~\"dev|staging\"} > 3000",
                     "smtp_spool_pending{environment=~\"dev|staging\"} > 200",
                     "> 300", "> 480", "> 180", "> 50", "> 150", "> 20"):
        assert fragment in text, fragment


def unit(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_service() -> None:
    svc = unit(PACKAGING / "systemd/kotlin-smtp.service")
    assert svc["Type"] == ["notify"]
    assert svc["ExecStart"][0].endswith(
        "twistd -n --pidfile= smtp --config /etc/kotlin-smtp/config.yaml")
    assert svc["User"] == ["kotlin-smtp"]
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["true"]
    assert "/var/lib/kotlin-smtp" in svc["ReadWritePaths"][0].split()
    assert int(svc["TimeoutStopSec"][0]) > GRACE_SECONDS
    sock = unit(PACKAGING / "systemd/kotlin-smtp.socket")
    assert sock["Service"] == ["kotlin-smtp.service"] and sock["ListenStream"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    for name in ("kotlin-smtp.service", "kotlin-smtp.socket"):
        shutil.copy(PACKAGING / "systemd" / name, tmp_path / name)
    for name in ("kotlin-smtp.service", "kotlin-smtp.socket"):
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=30, cwd=tmp_path)
        problems = [line for line in proc.stderr.splitlines()
                    if line.strip() and "is not executable" not in line]
        assert not problems, problems


def k8s_container() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((PACKAGING / "k8s-deployment.smtp.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > GRACE_SECONDS
    assert deployment["spec"]["replicas"] >= 2
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def test_probe_paths_are_served_by_default_config() -> None:
    config = Config()
    from twisted.internet import task
    routes = build_routes(config, _Endpoints(config, Metrics(), [], Readiness(), task.Clock(), 1))
    probes = yaml.safe_load((PACKAGING / "k8s-probes.yaml").read_text())
    container = k8s_container()
    port = config.management.server.port
    for source in (probes, container):
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = source[kind]["httpGet"]
            assert get["path"].encode() in routes, get["path"]
            assert get["port"] in (port, "management")
    assert {"name": "management", "containerPort": port} in container["ports"]


def test_pdb_and_service() -> None:
    pdb = yaml.safe_load((PACKAGING / "k8s-pdb.smtp.yaml").read_text())
    assert pdb["kind"] == "PodDisruptionBudget" and pdb["spec"]["minAvailable"] >= 1
    services = list(yaml.safe_load_all((PACKAGING / "k8s-service.smtp.yaml").read_text()))
    assert {s["kind"] for s in services} == {"Service"}


def test_compose_has_redis_and_app() -> None:
    compose = yaml.safe_load((PACKAGING / "docker-compose.smtp.yml").read_text())
    assert set(compose["services"]) == {"redis", "smtp-app"}
    app = compose["services"]["smtp-app"]
    assert "redis" in app["depends_on"]
    assert app["environment"]["SMTP_SPOOL_DIR"] == "/data/spool"


@pytest.mark.parametrize("source", ["config.container.yaml", "config.compose.yaml", "k8s"])
def test_shipped_configs_load(source: str, tmp_path: Path) -> None:
    if source == "k8s":
        docs = yaml.safe_load_all((PACKAGING / "k8s-deployment.smtp.yaml").read_text())
        text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    else:
        text = (PACKAGING / source).read_text()
    env = {f"SMTP_{k}_DIR": str(tmp_path / k.lower())
           for k in ("SPOOL", "MAILBOX", "TEMP", "LISTS")}
    config = load_text(text, env)
    assert config.management.endpoint.health.probes.enabled


def test_operations_doc_names_every_metric_and_probe() -> None:
    text = (PACKAGING.parent / "docs" / "OPERATIONS.md").read_text()
    for name in METRIC_NAMES:
        assert f"`{name}`" in text, name
    for path in ("/actuator/health/liveness", "/actuator/health/readiness", "/livez", "/readyz",
                 "/actuator/prometheus", "/metrics", "/actuator/info"):
        assert path in text, path
