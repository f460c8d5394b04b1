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
    assert {path.name for path in components} == {
        "loadgen",
        "redis",
        "servicemonitor",
        "spark-build",
        "multiworker-training",
    }
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


# -- the offline build past one machine (components/spark-build, components/multiworker-training)
BUILD_COMPONENTS = ("spark-build", "multiworker-training")
SPARK_DRIVER = "recsys-spark-driver"
# What the Spark driver's token may do (components/spark-build/rbac.yaml says why each).
SPARK_DRIVER_RULES = {
    "pods": {"create", "get", "list", "watch", "patch", "delete", "deletecollection"},
    "configmaps": {"create", "deletecollection"},
}
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"


@functools.cache
def _rendered_with(overlay: str, components: tuple[str, ...]) -> str:
    """The overlay with `components` listed in its own kustomization, as an operator adds them
    (so that its `images:` and `namespace` apply to them as well)."""
    with TemporaryDirectory() as directory:
        tree = Path(directory) / "k8s"
        shutil.copytree(K8S, tree)
        kustomization = tree / "overlays" / overlay / "kustomization.yaml"
        document = yaml.safe_load(kustomization.read_text())
        document["components"] = document.get("components", []) + [
            f"../../components/{component}" for component in components
        ]
        kustomization.write_text(yaml.safe_dump(document))
        return json.dumps(render.render(kustomization.parent))


def rendered_with(overlay: str, *components: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = json.loads(_rendered_with(overlay, components))
    return objects


def job_pod(cronjob: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    return pod


def init_container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec["initContainers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def expanded_env(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's variables as Kubernetes sets them: downward-API fields from `fields`, and
    $(NAME) replaced only by variables defined earlier in the list (a later one stays as is)."""
    values: dict[str, str] = {}
    for variable in container.get("env", []):
        if "value" in variable:
            value = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda match: values.get(match.group(1), match.group(0)),
                variable["value"],
            )
        else:
            value = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        values[variable["name"]] = value
    return values


def arg_value(container: dict[str, Any], flag: str) -> str:
    values: list[str] = [arg.split("=", 1)[1] for arg in container["args"] if arg.startswith(f"{flag}=")]
    assert len(values) == 1, (container["name"], flag)
    return values[0]


def headless_service_for(objects: list[dict[str, Any]], pod: dict[str, Any]) -> dict[str, Any]:
    """The Service that gives an Indexed Job's pods their DNS names: named as their subdomain,
    headless, publishing pods that are not Ready (they work in init containers), selecting them."""
    service = one(objects, "Service", pod["spec"]["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert _selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    return service


def _gibibytes(quantity: str) -> float:
    """A Spark size (`3g`, `512m`) or a Kubernetes quantity (`6Gi`, `512Mi`) in GiB."""
    units = {"g": 1.0, "m": 1 / 1024, "Gi": 1.0, "Mi": 1 / 1024}
    for suffix in ("Gi", "Mi", "g", "m"):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * units[suffix]
    raise AssertionError(f"unexpected quantity {quantity!r}")


def assert_locked_down(pod_spec: dict[str, Any], name: str) -> None:
    assert pod_spec["securityContext"]["runAsNonRoot"] is True, name
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
    for container in render.containers(pod_spec):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, (name, container["name"])
        assert security["allowPrivilegeEscalation"] is False, (name, container["name"])
        assert security["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])


def assert_writes_the_store(pod_spec: dict[str, Any], build: dict[str, Any]) -> None:
    """The build container writes the model store at the path its --store names."""
    store = arg_value(build, "--store")
    mounts = {mount["mountPath"]: mount for mount in build["volumeMounts"]}
    assert not mounts[store].get("readOnly", False)
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    assert volumes[mounts[store]["name"]]["persistentVolumeClaim"] == {"claimName": "recsys-models"}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("component", BUILD_COMPONENTS)
def test_build_components_render_validate_and_are_locked_down(overlay, component):
    objects = rendered_with(overlay, component)
    assert render.validate(objects) == []
    base = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered(overlay)}
    added = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) not in base]
    namespace = one(objects, "Namespace", "recsys" if overlay == "prod" else "recsys-dev")
    assert added
    assert {obj["metadata"]["namespace"] for obj in added} == {namespace["metadata"]["name"]}
    base_pod = job_pod(one(objects, "CronJob", "recsys-build"))["spec"]
    for cronjob in (obj for obj in added if obj["kind"] == "CronJob"):
        assert cronjob["spec"]["suspend"] is True  # runs when created as a Job
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
        pod = job_pod(cronjob)["spec"]
        assert_locked_down(pod, cronjob["metadata"]["name"])
        for container in render.containers(pod):
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]
            limit, request = container["resources"]["limits"], container["resources"]["requests"]
            assert _gibibytes(limit["memory"]) >= _gibibytes(request["memory"]), container["name"]
        # The shared parts cannot drift from the base build's.
        assert init_container(pod, "fetch-data") == init_container(base_pod, "fetch-data")
        push, base_push = one_container(pod, "push-features"), one_container(base_pod, "push-features")
        assert {k: v for k, v in push.items() if k not in ("command", "args")} == {
            k: v for k, v in base_push.items() if k not in ("command", "args")
        }
        build = init_container(pod, "build")
        assert build["image"] == init_container(base_pod, "build")["image"]
        assert (
            build["args"][: len(init_container(base_pod, "build")["args"])]
            == init_container(base_pod, "build")["args"]
        )
        assert_writes_the_store(pod, build)
        # Only the Spark driver has a token, and only because it calls the API (its own test).
        expected_token = pod["serviceAccountName"] == SPARK_DRIVER
        assert pod["automountServiceAccountToken"] is expected_token, cronjob["metadata"]["name"]
    for account in (obj for obj in added if obj["kind"] == "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False  # only a pod that asks gets one


def spark_build(objects: list[dict[str, Any]], job: str) -> dict[str, Any]:
    """The Spark build's pieces, with the driver's settings as a pod of Job `job` would see them."""
    cronjob = one(objects, "CronJob", "recsys-spark-build")
    pod = job_pod(cronjob)
    build = init_container(pod["spec"], "build")
    namespace = cronjob["metadata"]["namespace"]
    env = expanded_env(
        build,
        {
            "metadata.name": f"{job}-0-x7k2p",
            "metadata.namespace": namespace,
            "status.podIP": "10.1.2.3",
            JOB_NAME_LABEL: job,
        },
    )
    from recsys.commands.build import spark_conf

    return {
        "cronjob": cronjob,
        "pod": pod,
        "build": build,
        "env": env,
        "conf": dict(spark_conf(env["RECSYS_SPARK_CONF"])),
        "namespace": namespace,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spark_driver_has_a_token_bound_to_a_minimal_role(overlay):
    objects = rendered_with(overlay, "spark-build")
    spark = spark_build(objects, "recsys-spark-build-manual")
    pod = spark["pod"]["spec"]
    assert pod["serviceAccountName"] == SPARK_DRIVER
    assert pod["automountServiceAccountToken"] is True
    one(objects, "ServiceAccount", SPARK_DRIVER)
    bindings = [obj for obj in objects if obj["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert [binding["metadata"]["name"] for binding in bindings] == [SPARK_DRIVER]  # nothing else granted
    binding = bindings[0]
    assert binding["kind"] == "RoleBinding"  # this namespace only
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": SPARK_DRIVER,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": SPARK_DRIVER, "namespace": spark["namespace"]}
    ]
    assert not [obj for obj in objects if obj["kind"] == "ClusterRole"]
    rules = one(objects, "Role", SPARK_DRIVER)["rules"]
    granted: dict[str, set[str]] = {}
    for rule in rules:
        assert rule["apiGroups"] == [""], rule
        assert "resourceNames" not in rule
        for resource in rule["resources"]:
            assert resource not in granted, resource
            granted[resource] = set(rule["verbs"])
    assert granted == SPARK_DRIVER_RULES
    # Spark's clean-up of Services and claims (which client mode never makes) is off, so that the
    # Role needs neither.
    conf = spark["conf"]
    assert conf["spark.kubernetes.driver.service.deleteOnTermination"] == "false"
    assert conf["spark.kubernetes.driver.ownPersistentVolumeClaim"] == "false"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_spark_executors_run_the_driver_image_and_reach_the_driver_by_name(overlay):
    objects = rendered_with(overlay, "spark-build")
    job = "recsys-spark-build-202612031500"
    spark = spark_build(objects, job)
    cronjob, pod, build, conf = spark["cronjob"], spark["pod"], spark["build"], spark["conf"]
    assert arg_value(build, "--engine") == "spark"
    assert arg_value(build, "--spark-master") == "k8s://https://kubernetes.default.svc"
    assert conf["spark.kubernetes.namespace"] == spark["namespace"]
    # The driver pod owns its executors: deleting the build pod deletes them.
    assert conf["spark.kubernetes.driver.pod.name"] == f"{job}-0-x7k2p"
    # An Indexed Job of one: its pod's hostname is `<job>-0`, resolvable in the subdomain.
    template = cronjob["spec"]["jobTemplate"]["spec"]
    assert (template["completionMode"], template["completions"], template["parallelism"]) == ("Indexed", 1, 1)
    service = headless_service_for(objects, pod)
    assert service["metadata"]["name"] == SPARK_DRIVER
    assert conf["spark.driver.host"] == f"{job}-0.{service['metadata']['name']}"
    assert conf["spark.driver.bindAddress"] == "10.1.2.3"
    ports = {port["name"]: port["containerPort"] for port in build["ports"]}
    wanted = {int(conf["spark.driver.port"]), int(conf["spark.driver.blockManager.port"])}
    assert {port["port"] for port in service["spec"]["ports"]} == wanted
    # Numeric: Kubernetes resolves a named target port in the containers only, not init containers.
    assert {port["targetPort"] for port in service["spec"]["ports"]} == wanted <= set(ports.values())
    # The executors' image is the driver's, as the overlay pins it (components/spark-build/images.yaml).
    assert conf["spark.kubernetes.container.image"] == build["image"]
    if overlay == "prod":
        assert build["image"] == "registry.example.com/recsys/train:0.1.0"
    # Executors: sized, their own token-less account, the pod template mounted where the conf says.
    assert int(conf["spark.executor.instances"]) >= 1
    assert int(conf["spark.executor.cores"]) >= 1
    executor_memory = _gibibytes(conf["spark.executor.memory"]) + _gibibytes(
        conf["spark.executor.memoryOverhead"]
    )
    assert executor_memory >= 2
    driver_limit = _gibibytes(build["resources"]["limits"]["memory"])
    assert driver_limit >= _gibibytes(conf["spark.driver.memory"]) + 4  # the build process beside the JVM
    executor_account = one(
        objects, "ServiceAccount", conf["spark.kubernetes.authenticate.executor.serviceAccountName"]
    )
    assert executor_account["automountServiceAccountToken"] is False
    template_path = Path(conf["spark.kubernetes.executor.podTemplateFile"])
    mount = one_mount(build, template_path)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    config_map = one(objects, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    assert re.fullmatch(r"recsys-spark-executor-[a-z0-9]{10}", config_map["metadata"]["name"])
    executor_pod = yaml.safe_load(config_map["data"][template_path.name])
    assert render.validate([executor_pod]) == []
    assert_locked_down(executor_pod["spec"], "executor pod template")
    assert executor_pod["spec"]["automountServiceAccountToken"] is False
    assert executor_pod["spec"]["serviceAccountName"] == executor_account["metadata"]["name"]
    (executor,) = executor_pod["spec"]["containers"]
    assert executor["name"] == conf["spark.kubernetes.executor.podTemplateContainerName"]
    assert executor["command"] == ["/opt/recsys/spark-executor.sh"]
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile.train").read_text()
    assert "COPY deploy/docker/spark-executor.sh /opt/recsys/spark-executor.sh" in dockerfile
    assert "openjdk-17-jre-headless" in dockerfile
    # prod denies ingress by default: executors may reach the driver's ports, and each other.
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    driver_labels = pod["metadata"]["labels"]
    executor_labels = executor_pod["metadata"]["labels"]
    to_driver = [p for p in policies if _selects(p["spec"]["podSelector"], driver_labels)]
    assert any(
        any(_selects(peer["podSelector"], executor_labels) for peer in rule.get("from", []))
        and wanted <= {port["port"] for port in rule.get("ports", [])}
        for policy in to_driver
        for rule in policy["spec"].get("ingress", [])
    )
    to_executors = [p for p in policies if _selects(p["spec"]["podSelector"], executor_labels)]
    for labels in (driver_labels, executor_labels):
        assert any(
            any(_selects(peer["podSelector"], labels) for peer in rule.get("from", []))
            and "ports" not in rule
            for policy in to_executors
            for rule in policy["spec"].get("ingress", [])
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_multiworker_hosts_match_the_indexed_job_and_its_service(overlay):
    objects = rendered_with(overlay, "multiworker-training")
    cronjob = one(objects, "CronJob", "recsys-multiworker-build")
    job_spec = cronjob["spec"]["jobTemplate"]["spec"]
    pod = job_pod(cronjob)
    build = init_container(pod["spec"], "build")
    job = "recsys-mw-202612031500"
    env = expanded_env(build, {JOB_NAME_LABEL: job})
    hosts = env["RECSYS_TF_WORKER_HOSTS"].split(",")
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == len(hosts) == 2
    service = headless_service_for(objects, pod)
    port = {p["name"]: p["containerPort"] for p in build["ports"]}["tf-worker"]
    # Kubernetes names an Indexed Job's pods' hosts `<job>-<index>`, in the pods' subdomain.
    assert hosts == [f"{job}-{index}.{service['metadata']['name']}:{port}" for index in range(len(hosts))]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port)]
    # The same build command on every index, and the base build's: the build handles the roles.
    base_build = init_container(job_pod(one(objects, "CronJob", "recsys-build"))["spec"], "build")
    assert build["args"] == base_build["args"]
    assert "JOB_COMPLETION_INDEX" not in env  # Kubernetes sets it per pod
    assert_writes_the_store(pod["spec"], build)
    # Synchronous training: a failed worker fails the Job, rather than a lone restarted index.
    assert pod["spec"]["restartPolicy"] == "Never"
    assert job_spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "build", "operator": "NotIn", "values": [0]}}
    ]
    assert 0 <= job_spec["backoffLimit"] <= 1
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(_selects(term["podAffinityTerm"]["labelSelector"], pod["metadata"]["labels"]) for term in anti)
    policies = [obj for obj in objects if obj["kind"] == "NetworkPolicy"]
    labels = pod["metadata"]["labels"]
    assert any(
        _selects(policy["spec"]["podSelector"], labels)
        and any(_selects(peer["podSelector"], labels) for peer in rule.get("from", []))
        and port in {p["port"] for p in rule.get("ports", [])}
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
    )


@pytest.mark.skipif(shutil.which("sh") is None, reason="no POSIX shell")
def test_only_the_chief_worker_pushes_the_features(tmp_path):
    cronjob = one(rendered_with("prod", "multiworker-training"), "CronJob", "recsys-multiworker-build")
    push = one_container(job_pod(cronjob)["spec"], "push-features")
    assert push["command"][0] == "sh"
    fake = tmp_path / "recsys"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$CALLED"\n')
    fake.chmod(0o755)
    calls = {}
    for index in ("0", "1"):
        called = tmp_path / f"called-{index}"
        result = subprocess.run(
            [*push["command"], *push["args"]],
            env={"PATH": f"{tmp_path}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index, "CALLED": str(called)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        calls[index] = called.read_text().split() if called.exists() else None
    assert calls == {"0": ["store", "push-features", "--store=/models"], "1": None}


# -- the Spark executors' command (deploy/docker/spark-executor.sh) ----------------------------
EXECUTOR_SCRIPT = ROOT / "deploy" / "docker" / "spark-executor.sh"
EXECUTOR_ENV = {
    "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@build-0.recsys-spark-driver:7078",
    "SPARK_EXECUTOR_ID": "3",
    "SPARK_EXECUTOR_CORES": "2",
    "SPARK_EXECUTOR_MEMORY": "3072m",
    "SPARK_APPLICATION_ID": "spark-1234",
    "SPARK_EXECUTOR_POD_IP": "10.1.2.4",
    "SPARK_EXECUTOR_POD_NAME": "recsys-build-exec-3",
    "SPARK_RESOURCE_PROFILE_ID": "0",
}


def _run_executor_script(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    fake_java = tmp_path / "java"
    fake_java.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake_java.chmod(0o755)
    return subprocess.run(
        ["bash", str(EXECUTOR_SCRIPT), *args],
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_executor_script_starts_the_kubernetes_executor_backend_with_the_driver_options(tmp_path):
    env = EXECUTOR_ENV | {
        "SPARK_HOME": "/opt/spark",
        "SPARK_CONF_DIR": "/opt/spark/conf",
        # In index order, not the environment's: 10 after 2; a space stays inside its option.
        "SPARK_JAVA_OPT_10": "-Dlast=10",
        "SPARK_JAVA_OPT_0": "--add-opens=java.base/java.lang=ALL-UNNAMED",
        "SPARK_JAVA_OPT_2": "-Dspark.app.name=recsys build",
    }
    result = _run_executor_script(tmp_path, env, "executor")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "--add-opens=java.base/java.lang=ALL-UNNAMED",
        "-Dspark.app.name=recsys build",
        "-Dlast=10",
        "-Xms3072m",
        "-Xmx3072m",
        "-cp",
        "/opt/spark/conf:/opt/spark/jars/*",
        "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend",
        "--driver-url",
        EXECUTOR_ENV["SPARK_DRIVER_URL"],
        "--executor-id",
        "3",
        "--cores",
        "2",
        "--app-id",
        "spark-1234",
        "--hostname",
        "10.1.2.4",
        "--resourceProfileId",
        "0",
        "--podName",
        "recsys-build-exec-3",
    ]
    missing = {key: value for key, value in EXECUTOR_ENV.items() if key != "SPARK_DRIVER_URL"}
    result = _run_executor_script(tmp_path, missing | {"SPARK_HOME": "/opt/spark"}, "executor")
    assert result.returncode == 2
    assert "SPARK_DRIVER_URL is not set" in result.stderr
    result = _run_executor_script(tmp_path, env, "driver")
    assert result.returncode == 2
    assert "must be 'executor'" in result.stderr


def test_executor_backend_class_ships_with_pyspark():
    pyspark = pytest.importorskip("pyspark", reason="PySpark is not installed (pip install '.[spark]')")
    import zipfile

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("spark-kubernetes_*.jar"))
    assert len(jars) == 1, jars
    with zipfile.ZipFile(jars[0]) as jar:
        assert "org/apache/spark/scheduler/cluster/k8s/KubernetesExecutorBackend.class" in jar.namelist()


def test_every_spark_setting_of_the_build_is_one_spark_defines():
    """Spark ignores an unknown key with a warning at most: a misspelt one would change nothing."""
    pyspark = pytest.importorskip("pyspark", reason="PySpark is not installed (pip install '.[spark]')")
    import zipfile

    jars = Path(pyspark.__file__).parent / "jars"
    (core,) = jars.glob("spark-core_*.jar")
    (kubernetes,) = jars.glob("spark-kubernetes_*.jar")
    # Where Spark declares its settings: the names are string constants of these classes.
    with zipfile.ZipFile(core) as jar:
        declared = jar.read("org/apache/spark/internal/config/package$.class")
    with zipfile.ZipFile(kubernetes) as jar:
        declared += jar.read("org/apache/spark/deploy/k8s/Config$.class")
    spark = spark_build(rendered_with("prod", "spark-build"), "recsys-spark-build-manual")
    assert len(spark["conf"]) > 10
    for key in spark["conf"]:
        # Some names are built at run time (`...authenticate.executor` + `.serviceAccountName`).
        parts = key.split(".")
        assert key.encode() in declared or any(
            ".".join(parts[:cut]).encode() in declared and ("." + ".".join(parts[cut:])).encode() in declared
            for cut in range(2, len(parts))
        ), key


def test_docker_contexts_admit_every_file_the_dockerfiles_copy():
    admitted = [
        line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for dockerfile in ("Dockerfile.train", "Dockerfile.serve"):
        for line in (ROOT / "deploy" / "docker" / dockerfile).read_text().splitlines():
            parts = line.split()
            if not parts or parts[0] != "COPY" or parts[1].startswith("--from"):
                continue
            for source in parts[1:-1]:
                assert any(source == path or source.startswith(f"{path}/") for path in admitted), (
                    dockerfile,
                    source,
                )
                assert (ROOT / source).exists(), source


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
