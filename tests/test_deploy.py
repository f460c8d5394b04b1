"""Deployment artefacts: the Kubernetes overlays render and validate against the Kubernetes
schemas, keep the promises docs/operations.md makes (locked-down pods, probes and ports that
match the services' settings, no credentials, prod autoscaled and fenced), and the dashboard
and alert rules query only metrics the services export. Offline, a few seconds."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from tempfile import TemporaryDirectory
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
SERVICES = {
    "recall": ("RECSYS_RECALL", "recsys.v1.Recall"),
    "rank": ("RECSYS_RANK", "recsys.v1.Rank"),
    "gateway": ("RECSYS_GATEWAY", "recsys.v1.Recommender"),
}
# Named by the dashboard and the alert rules but not exported yet (docs/operations.md,
# "Model age"): the current version's manifest created_at, in unix seconds.
PROPOSED_METRICS = {f"recsys_{service}_model_created_timestamp_seconds" for service in SERVICES}
# The supervisor's margin beyond shutdown delay + grace before it kills a worker
# (services/common/workers.py).
SUPERVISOR_MARGIN_SECONDS = 5.0


def _load(path: Path, name: str) -> ModuleType:
    """Import a script that is not part of a package (deploy/, loadtest/)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


render: Any = _load(K8S / "manifests.py", "recsys_deploy_manifests")
# kustomize renders the overlays; without kubectl there is nothing to check them with.
pytestmark = pytest.mark.skipif(
    render.kubectl() is None, reason="kubectl is not installed (kubectl >= 1.27 carries kustomize v5)"
)


@functools.cache
def _rendered(overlay: str) -> str:
    return json.dumps(render.render(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    """A fresh copy of the overlay's objects (rendered once per test session)."""
    objects: list[dict[str, Any]] = json.loads(_rendered(overlay))
    return objects


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def generated(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The ConfigMap kustomize generated as `name` (with its content-hash suffix)."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == "ConfigMap" and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", obj["metadata"]["name"])
    ]
    assert len(found) == 1, name
    return found[0]


def settings_map(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = generated(objects, "recsys-settings")["data"]
    return data


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [obj for obj in objects if any(True for _ in render.pod_specs(obj))]


# -- rendering and schemas ------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay):
    objects = rendered(overlay)
    assert render.validate(objects) == []
    kinds = {obj["kind"] for obj in objects}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ConfigMap",
        "PersistentVolumeClaim",
        "CronJob",
    } <= kinds
    assert not any(render.is_custom_resource(obj) for obj in objects)


def test_validation_is_strict_about_unknown_fields_types_and_kinds():
    unknown_field = one(rendered("prod"), "Deployment", "gateway")
    unknown_field["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["path"] = "/healthz"
    wrong_type = one(rendered("prod"), "Deployment", "gateway")
    wrong_type["spec"]["revisionHistoryLimit"] = "five"
    # A misspelt kind has no schema: reported, not skipped as if it were a custom resource.
    unknown_kind = {"apiVersion": "apps/v1", "kind": "Deployement", "metadata": {"name": "x"}, "spec": {}}
    problems = render.validate([unknown_field, wrong_type, unknown_kind])
    assert len(problems) == 3, problems
    assert "readinessProbe.grpc" in problems[0]
    assert "'path' was unexpected" in problems[0]
    assert "spec.revisionHistoryLimit" in problems[1]
    assert problems[2].startswith("Deployement/x")


def test_kustomize_errors_are_reported_with_its_message(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(render.RenderError, match=r"missing\.yaml"):
        render.render(tmp_path)


def test_make_k8s_writes_validated_overlays(tmp_path):
    result = subprocess.run(
        [sys.executable, str(K8S / "manifests.py"), "--validate", "--out", str(tmp_path)]
        + [str(K8S / "overlays" / overlay) for overlay in OVERLAYS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "0 problems" in result.stderr
    for overlay in OVERLAYS:
        written = [obj for obj in yaml.safe_load_all((tmp_path / f"{overlay}.yaml").read_text()) if obj]
        assert sorted(o["metadata"]["name"] for o in written) == sorted(
            o["metadata"]["name"] for o in rendered(overlay)
        )


def test_optional_components_render_on_top_of_prod(tmp_path):
    components = sorted(path for path in (K8S / "components").iterdir() if path.is_dir())
    assert {path.name for path in components} == {"loadgen", "redis", "servicemonitor"}
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / "everything"
    overlay.mkdir()
    # kustomize accepts only relative paths below or beside the kustomization.
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "recsys",  # as when the components are listed in prod's own file
                "resources": ["../prod"],
                "components": [f"../../components/{path.name}" for path in components],
            }
        )
    )
    objects = render.render(overlay)
    assert render.validate(objects) == []  # the ServiceMonitor (a custom resource) is skipped
    monitor = one(objects, "ServiceMonitor", "recsys")
    assert monitor["metadata"]["namespace"] == "recsys"
    wanted = {
        expression["key"]: set(expression["values"])
        for expression in monitor["spec"]["selector"]["matchExpressions"]
    }
    scraped = [
        service
        for service in objects
        if service["kind"] == "Service"
        and all(service["metadata"]["labels"].get(label) in values for label, values in wanted.items())
    ]
    with_metrics = [s for s in scraped if "metrics" in {port["name"] for port in s["spec"]["ports"]}]
    # The headless Services match the selector too but have no metrics port: no double scrape.
    assert {service["metadata"]["name"] for service in with_metrics} == set(SERVICES)
    assert {service["metadata"]["name"] for service in scraped} - set(SERVICES) == {
        "recall-headless",
        "rank-headless",
    }
    redis = one(objects, "StatefulSet", "redis")
    assert redis["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {
        "name": "recsys-redis",
        "key": "password",
    }


# -- what the manifests promise -------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down_and_sized(overlay):
    for workload in workloads(rendered(overlay)):
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        for pod in render.pod_specs(workload):
            assert pod["automountServiceAccountToken"] is False, name
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            for container in render.containers(pod):
                where = f"{name} {container['name']}"
                security = container["securityContext"]
                assert security["readOnlyRootFilesystem"] is True, where
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"] == {"drop": ["ALL"]}, where
                assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
                assert "memory" in container["resources"]["limits"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_request_a_core_per_worker_and_are_never_throttled(overlay):
    objects = rendered(overlay)
    settings = settings_map(objects)
    autoscalers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    for name, (prefix, _) in SERVICES.items():
        container = one_container(one(objects, "Deployment", name)["spec"]["template"]["spec"], name)
        resources = container["resources"]
        assert "cpu" not in resources["limits"], name  # a CFS quota would throttle a busy process
        if overlay == "prod":  # dev asks for less so that the stack fits a laptop
            assert _cores(resources["requests"]["cpu"]) == int(settings[f"{prefix}_WORKERS"]), name
            # Utilisation is relative to the request: 60 % of one core, below saturation.
            target = autoscalers[name]["spec"]["metrics"][0]["resource"]["target"]
            assert target == {"type": "Utilization", "averageUtilization": 60}, name
        assert _mebibytes(resources["limits"]["memory"]) >= _mebibytes(resources["requests"]["memory"])


def _cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_targets_headless_services_so_calls_spread_over_pods(overlay):
    objects = rendered(overlay)
    settings = settings_map(objects)
    for name, setting in (("recall", "RECSYS_GATEWAY_RECALL_ADDR"), ("rank", "RECSYS_GATEWAY_RANK_ADDR")):
        port = int(settings[f"{SERVICES[name][0]}_PORT"])
        # dns:/// makes gRPC resolve every A record; round_robin then calls each pod in turn.
        assert settings[setting] == f"dns:///{name}-headless:{port}"
        headless = one(objects, "Service", f"{name}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert not headless["spec"].get("publishNotReadyAddresses", False)  # a loading pod gets no calls
        selector = one(objects, "Deployment", name)["spec"]["selector"]["matchLabels"]
        assert headless["spec"]["selector"] == selector
        assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(port, "grpc")]
    from services.common.settings import ClientSettings

    assert ClientSettings().load_balancing == "round_robin"
    assert ClientSettings().health_checking is True  # round_robin skips pods not SERVING
    assert not [key for key in settings if key.startswith("RECSYS_GATEWAY_CLIENT")]


# Which service reads which configuration file, and the setting that names it.
CONFIG_READERS = {
    "gateway": {"scenes": "SCENES_FILE", "experiments": "EXPERIMENTS_FILE", "blocklist": "BLOCKLIST_FILE"},
    "rank": {"scenes": "SCENES_FILE"},
    "recall": {"blocklist": "BLOCKLIST_FILE"},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scenes_experiments_and_blocklist_are_mounted_where_the_settings_point(overlay):
    from recsys.blocklist import Blocklist
    from recsys.scenes import ExperimentConfig, load_scenes
    from recsys.serving_model import ALL_CHANNELS

    objects = rendered(overlay)
    settings = settings_map(objects)
    maps = {}
    for config in ("scenes", "experiments", "blocklist"):
        # Not hash-suffixed: an edit must reach the mounted files in place, not roll the pods.
        maps[config] = one(objects, "ConfigMap", f"recsys-{config}")
    for name, configs in CONFIG_READERS.items():
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        container = one_container(pod, name)
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for config, setting in configs.items():
            path = Path(settings[f"{SERVICES[name][0]}_{setting}"])
            mount = one_mount(container, path)
            assert "subPath" not in mount  # subPath mounts are never updated by the kubelet
            assert volumes[mount["name"]]["configMap"]["name"] == f"recsys-{config}"
            assert path.name in maps[config]["data"], (name, config)
    with TemporaryDirectory() as directory:
        for data in maps.values():
            for file_name, text in data["data"].items():
                (Path(directory) / file_name).write_text(text)
        scenes = load_scenes(Path(directory) / "scenes.json", channels=ALL_CHANNELS)
        assert "default" in scenes
        ExperimentConfig.load(Path(directory) / "experiments.json", scenes=scenes, channels=ALL_CHANNELS)
        assert len(Blocklist.load(Path(directory) / "blocklist.txt")) == 0


def one_mount(container: dict[str, Any], path: Path) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        m for m in container["volumeMounts"] if path.parent == Path(m["mountPath"])
    ]
    assert len(mounts) == 1, (container["name"], str(path))
    return mounts[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pod_loads_its_model_from_a_local_copy(overlay):
    objects = rendered(overlay)
    settings = settings_map(objects)
    for name, (prefix, _) in SERVICES.items():
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        local = settings[f"{prefix}_LOCAL_MODEL_DIR"]
        mounts = {m["mountPath"]: m for m in one_container(pod, name)["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        assert "emptyDir" in volumes[mounts[local]["name"]], name
        assert not mounts[local].get("readOnly", False), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_grace_match_the_services_settings(overlay):
    objects = rendered(overlay)
    settings = settings_map(objects)
    for name, (prefix, grpc_service) in SERVICES.items():
        deployment = one(objects, "Deployment", name)
        pod = deployment["spec"]["template"]
        container = one_container(pod["spec"], name)
        port = int(settings[f"{prefix}_PORT"])
        metrics_port = int(settings[f"{prefix}_METRICS_PORT"])
        assert settings[f"{prefix}_HOST"] == "0.0.0.0"  # 127.0.0.1, the default, is unreachable
        assert container["args"] == ["serve", name]
        ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
        assert ports["grpc"] == port
        assert ports["metrics"] == metrics_port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        assert container["readinessProbe"]["grpc"]["service"] == grpc_service
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == metrics_port
        shutdown = float(settings[f"{prefix}_SHUTDOWN_DELAY_SECONDS"]) + float(
            settings[f"{prefix}_GRACE_SECONDS"]
        )
        assert pod["spec"]["terminationGracePeriodSeconds"] > shutdown + SUPERVISOR_MARGIN_SECONDS
        service = one(objects, "Service", name)
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        for service_port in service["spec"]["ports"]:
            assert service_port["targetPort"] in ports
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True
        assert settings[f"{prefix}_STORE"] == "/models"


def one_container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(containers) == 1
    return containers[0]


def _settings_fields() -> dict[str, set[str]]:
    from services.gateway.settings import GatewaySettings
    from services.recall.settings import RecallSettings

    fields = {
        "RECSYS_RECALL": set(RecallSettings.model_fields),
        "RECSYS_GATEWAY": set(GatewaySettings.model_fields),
    }
    try:
        from services.rank.settings import RankSettings
    except ImportError:  # the rank service is not in this checkout yet
        return fields
    fields["RECSYS_RANK"] = set(RankSettings.model_fields)
    return fields


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_variable_names_a_real_setting(overlay):
    """A misspelt variable would be ignored silently (the settings ignore unknown names)."""
    objects = rendered(overlay)
    names = set(settings_map(objects))
    for workload in workloads(objects):
        for pod in render.pod_specs(workload):
            names |= {variable["name"] for c in render.containers(pod) for variable in c.get("env", [])}
    fields = _settings_fields()
    checked = 0
    for name in names:
        for prefix, known in fields.items():
            if name.startswith(prefix + "_"):
                assert name[len(prefix) + 1 :].lower() in known, name
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_only_from_secrets(overlay):
    objects = rendered(overlay)
    assert not [obj for obj in objects if obj["kind"] == "Secret"]  # made out of band, never applied from git
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for name, value in obj["data"].items():
                assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), name  # user:password@ in a URL
                assert not re.search(r"PASSWORD|TOKEN|SECRET|REDIS", name), name
    for workload in workloads(objects):
        for pod in render.pod_specs(workload):
            for container in render.containers(pod):
                for variable in container.get("env", []):
                    if re.search(r"PASSWORD|TOKEN|SECRET|REDIS|AUTH", variable["name"]):
                        assert "secretKeyRef" in variable.get("valueFrom", {}), variable["name"]


def test_prod_is_autoscaled_budgeted_spread_and_fenced():
    objects = rendered("prod")
    for name in SERVICES:
        deployment = one(objects, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert "replicas" not in deployment["spec"]  # the autoscaler owns it
        autoscaler = one(objects, "HorizontalPodAutoscaler", name)
        assert autoscaler["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert autoscaler["spec"]["minReplicas"] >= 2
        assert [metric["resource"]["name"] for metric in autoscaler["spec"]["metrics"]] == ["cpu"]
        budget = one(objects, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"] == labels
        anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        terms = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        assert {term["podAffinityTerm"]["topologyKey"] for term in terms} >= {"kubernetes.io/hostname"}
        assert all(term["podAffinityTerm"]["labelSelector"]["matchLabels"] == labels for term in terms)
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    deny = one(policies, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    gateway_labels = one(objects, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    for name in ("recall", "rank"):
        labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        selecting = [policy for policy in policies if _selects(policy["spec"]["podSelector"], labels)]
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                ports = {port["port"] for port in rule["ports"]}
                if ports & {int(settings_map(objects)[f"{SERVICES[name][0]}_PORT"])}:
                    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [gateway_labels]
    clients = one(policies, "NetworkPolicy", "gateway-from-clients")
    assert all("from" not in rule for rule in clients["spec"]["ingress"])  # anyone may call the gateway


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_dev_runs_one_replica_of_each_without_autoscaling():
    objects = rendered("dev")
    for name in SERVICES:
        assert one(objects, "Deployment", name)["spec"]["replicas"] == 1
    assert not [obj for obj in objects if obj["kind"] in ("HorizontalPodAutoscaler", "PodDisruptionBudget")]
    assert one(objects, "StatefulSet", "redis")["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_build_writes_the_store_then_pushes_features(overlay):
    cronjob = one(rendered(overlay), "CronJob", "recsys-build")
    assert cronjob["spec"]["suspend"] is True  # runs when created as a Job, or once unsuspended
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-data", "build"]
    build = pod["initContainers"][1]
    assert build["args"][0] == "build"
    assert "--store=/models" in build["args"]
    assert "train" in build["image"]
    push = one_container(pod, "push-features")
    assert push["args"][:2] == ["store", "push-features"]
    assert "serve" in push["image"]
    claims = {
        volume["name"]: volume.get("persistentVolumeClaim", {}).get("claimName") for volume in pod["volumes"]
    }
    assert claims["models"] == "recsys-models"


# -- dashboard and alerts -------------------------------------------------------------------
def exported_metrics() -> set[str]:
    """Every series name the services can export (created via their metric factories)."""
    from services.common.versions import version_metrics
    from services.gateway.metrics import gateway_metrics
    from services.recall.metrics import recall_metrics

    gateway_metrics()
    recall_metrics()
    for service in SERVICES:
        version_metrics(service)
    try:
        from services.rank.metrics import rank_metrics
    except ImportError:  # not in this checkout yet: the names its metrics module declares
        rank = {"batch_size_calls", "batch_size_rows", "queue_wait_seconds", "inference_seconds"}
        names = {f"recsys_rank_{name}{suffix}" for name in rank for suffix in ("_bucket", "_sum", "_count")}
        names |= {f"recsys_rank_{name}_total" for name in ("scored_rows", "unknown_users", "unknown_items")}
    else:
        rank_metrics()
        names = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


METRIC_NAME = re.compile(r"\b(?:grpc_server|recsys)_[a-z0-9_]+\b")


def test_dashboard_panels_query_exported_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "recsys-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    known = exported_metrics() | PROPOSED_METRICS
    used: set[str] = set()
    for panel in panels:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= known, (panel["title"], names - known)
            assert target["expr"].count("(") == target["expr"].count(")"), panel["title"]
            used |= names
    # The list: rates, per-service and per-stage latency, channels, batches, degradation,
    # clicks per impression, model versions.
    for name in (
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "recsys_gateway_stage_seconds_bucket",
        "recsys_recall_channel_candidates_sum",
        "recsys_recall_channel_outcomes_total",
        "recsys_rank_batch_size_calls_bucket",
        "recsys_gateway_recommendations_total",
        "recsys_gateway_events_total",
        "recsys_recall_model_version_info",
    ):
        assert name in used, name


def test_alert_rules_parse_and_query_exported_metrics():
    document = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yaml").read_text())
    known = exported_metrics() | PROPOSED_METRICS
    alerts = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
            names = set(METRIC_NAME.findall(rule["expr"]))
            assert names, rule["alert"]
            assert names <= known, (rule["alert"], names - known)
            alerts[rule["alert"]] = rule
    for wanted in (
        "RecsysHighErrorRate",
        "RecsysRecommendLatencyHigh",
        "RecsysDegradedAnswers",
        "RecsysModelTooOld",
    ):
        assert wanted in alerts


# -- load test helpers ----------------------------------------------------------------------
def test_loadtest_targets_and_summary(tmp_path):
    runner: Any = _load(ROOT / "loadtest" / "run_loadtest.py", "recsys_run_loadtest")
    assert runner.split_target("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert runner.split_target("[::1]:50051") == ("::1", 50051)
    assert runner.is_loopback("127.0.0.1")
    assert runner.is_loopback("::1")
    assert runner.is_loopback("localhost")
    assert not runner.is_loopback("10.0.0.1")
    assert not runner.is_loopback("gateway")
    with pytest.raises(ValueError, match="TARGET"):
        runner.split_target("gateway")
    summary = tmp_path / "summary.json"
    summary.write_text(
        json.dumps(
            {
                "calls": [
                    {"name": "Recommend known user", "requests": 200, "failures": 2, "rps": 20.0}
                    | {"p50_ms": 12, "p95_ms": 30, "p99_ms": 55},
                    {"name": "Aggregated", "requests": 200, "failures": 2, "rps": 20.0}
                    | {"p50_ms": 12, "p95_ms": 30, "p99_ms": 55},
                ],
                "recommend": {"answers": 198, "degraded": 3, "reasons": {"rank_timeout": 3}},
            }
        )
    )
    table = runner.summary(summary)
    assert "req/s" in table
    assert "p99 ms" in table
    assert "Recommend known user" in table
    assert "2 (1.00 %)" in table
    assert "degraded answers: 3 of 198" in table
