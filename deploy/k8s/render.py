"""Render the kustomize overlays under deploy/k8s without kubectl, and validate the result.

    python deploy/k8s/render.py deploy/k8s/overlays/prod                # YAML on stdout
    python deploy/k8s/render.py --validate --out build/k8s deploy/k8s/overlays/*

`kubectl kustomize` is the reference renderer, but kubectl is not on every machine and
Debian's kustomize is old. This file implements exactly the kustomize features the overlays
use, with kustomize's semantics, and refuses any other field, so an overlay that grows a new
feature fails here loudly instead of rendering differently. Supported:

- Kustomization (kustomize.config.k8s.io/v1beta1) and Component (v1alpha1) files;
- `resources` (YAML files, or directories holding a kustomization) and `components`;
- `namespace` (set on every namespaced object);
- `configMapGenerator` with `literals`, `behavior` create|merge and
  `options.disableNameSuffixHash`; generated names get kustomize's content-hash suffix and
  every reference from a pod template (envFrom, env valueFrom, volumes) follows the rename;
- `patches` with `path` only: strategic-merge patches matched by kind and name (maps merge,
  `null` deletes a key, lists of containers, volumes, env, volumeMounts and ports merge by
  their key, other lists are replaced; `$patch` directives are refused);
- `replicas` (Deployment, StatefulSet, ReplicaSet) and `images` (newName, newTag, digest).

`tests/test_deploy.py` renders every overlay with this file, validates each object against
the Kubernetes JSON schemas bundled in the `kubernetes-validate` package (custom resources
such as the ServiceMonitor excepted), and, where kubectl exists, checks that
`kubectl kustomize` produces the same objects.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUBERNETES_VERSION = "1.30"  # the oldest minor the manifests promise to work on (docs/operations.md)

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "components",
        "namespace",
        "configMapGenerator",
        "patches",
        "replicas",
        "images",
    }
)
GENERATOR_FIELDS = frozenset({"name", "behavior", "literals", "options"})
# Kinds that are not namespaced, among those these manifests (could) use.
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PersistentVolume",
        "StorageClass",
        "PriorityClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)
REPLICATED = frozenset({"Deployment", "StatefulSet", "ReplicaSet"})
# Strategic-merge keys of the lists the overlays patch (from the Kubernetes API's
# x-kubernetes-patch-merge-key). `ports` holds containerPort in a container, port in a Service.
MERGE_KEYS = {
    "containers": ("name",),
    "initContainers": ("name",),
    "volumes": ("name",),
    "env": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
}
# Only generated objects carry this while rendering: their names still lack the hash.
_GENERATED = "__generated__"


class RenderError(ValueError):
    """An overlay uses something this renderer does not support, or is inconsistent."""


# -- loading --------------------------------------------------------------------------------
def load_documents(path: Path) -> list[Obj]:
    with path.open(encoding="utf-8") as stream:
        documents = [document for document in yaml.safe_load_all(stream) if document is not None]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return documents


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def key(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# -- rendering ------------------------------------------------------------------------------
def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize directory` would print (order aside)."""
    objects = _build(directory.resolve(), [], component=False)
    _name_generated(objects)
    for obj in objects:
        obj.pop(_GENERATED, None)
    return objects


def _build(directory: Path, objects: list[Obj], *, component: bool) -> list[Obj]:
    """Apply the kustomization in `directory` to `objects` (empty, except for a component,
    which transforms what the kustomization including it has gathered so far)."""
    path = kustomization_file(directory)
    with path.open(encoding="utf-8") as stream:
        spec = yaml.safe_load(stream) or {}
    unknown = set(spec) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{path}: unsupported field(s) {sorted(unknown)}: extend render.py or drop them")
    expected = "Component" if component else "Kustomization"
    if spec.get("kind", "Kustomization") != expected:
        raise RenderError(f"{path}: expected kind {expected}, got {spec.get('kind')}")
    if not component:
        objects = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            _add(objects, _build(target.resolve(), [], component=False), path)
        elif target.is_file():
            _add(objects, load_documents(target), path)
        else:
            raise RenderError(f"{path}: resource {entry} does not exist")
    for entry in spec.get("components", []):
        objects = _build((directory / entry).resolve(), objects, component=True)
    for generator in spec.get("configMapGenerator", []):
        _generate(objects, generator, path)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{path}: patches support only `path` (got {sorted(patch)})")
        for document in load_documents(directory / patch["path"]):
            _patch(objects, document, path)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = spec["namespace"]
    for replica in spec.get("replicas", []):
        _set_replicas(objects, replica["name"], int(replica["count"]), path)
    for image in spec.get("images", []):
        _set_image(objects, image, path)
    return objects


def _add(objects: list[Obj], new: Iterable[Obj], source: Path) -> None:
    present = {key(obj) for obj in objects}
    for obj in new:
        if key(obj) in present:
            raise RenderError(f"{source}: {key(obj)} is defined twice")
        present.add(key(obj))
        objects.append(copy.deepcopy(obj))


def _generate(objects: list[Obj], generator: Obj, source: Path) -> None:
    unknown = set(generator) - GENERATOR_FIELDS
    if unknown or set(generator.get("options", {})) - {"disableNameSuffixHash"}:
        raise RenderError(f"{source}: configMapGenerator supports only {sorted(GENERATOR_FIELDS)}")
    data: dict[str, str] = {}
    for literal in generator.get("literals", []):
        name, separator, value = str(literal).partition("=")
        if not separator:
            raise RenderError(f"{source}: literal {literal!r} is not NAME=VALUE")
        data[name] = value
    behavior = generator.get("behavior", "create")
    existing = [obj for obj in objects if key(obj) == ("ConfigMap", generator["name"])]
    if behavior == "create":
        if existing:
            raise RenderError(f"{source}: ConfigMap {generator['name']} exists (use behavior: merge)")
        hashed = not generator.get("options", {}).get("disableNameSuffixHash", False)
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
                _GENERATED: hashed,
            }
        )
    elif behavior == "merge":
        if not existing:
            raise RenderError(f"{source}: no ConfigMap {generator['name']} to merge into")
        existing[0].setdefault("data", {}).update(data)
    else:
        raise RenderError(f"{source}: configMapGenerator behavior {behavior!r} is not supported")


def _patch(objects: list[Obj], patch: Obj, source: Path) -> None:
    matches = [obj for obj in objects if key(obj) == key(patch)]
    if not matches:
        raise RenderError(f"{source}: the patch for {key(patch)} matches no object")
    for obj in matches:
        if obj["apiVersion"] != patch["apiVersion"]:
            raise RenderError(f"{source}: the patch for {key(patch)} has apiVersion {patch['apiVersion']}")
        merged = strategic_merge(obj, patch)
        obj.clear()
        obj.update(merged)


def strategic_merge(original: Any, patch: Any, field: str = "") -> Any:
    """Kubernetes strategic-merge-patch semantics for the subset described above."""
    if isinstance(patch, dict):
        if any(str(name).startswith("$") for name in patch):
            raise RenderError(f"{field}: $patch directives are not supported")
        if not isinstance(original, dict):
            return _without_nulls(patch)
        merged = dict(original)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = strategic_merge(merged[name], value, name)
            else:
                merged[name] = _without_nulls(value)
        return merged
    if isinstance(patch, list) and isinstance(original, list) and field in MERGE_KEYS:
        merged_list = list(original)
        for item in patch:
            merge_key = next((name for name in MERGE_KEYS[field] if name in item), None)
            if merge_key is None:
                raise RenderError(f"{field}: a patched item has none of {MERGE_KEYS[field]}")
            index = next(
                (i for i, old in enumerate(merged_list) if old.get(merge_key) == item[merge_key]), None
            )
            if index is None:
                merged_list.append(_without_nulls(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item, field)
        return merged_list
    return copy.deepcopy(patch)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: _without_nulls(item) for name, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _set_replicas(objects: list[Obj], name: str, count: int, source: Path) -> None:
    targets = [obj for obj in objects if obj["kind"] in REPLICATED and obj["metadata"]["name"] == name]
    if not targets:
        raise RenderError(f"{source}: replicas: no Deployment or StatefulSet named {name}")
    for obj in targets:
        obj["spec"]["replicas"] = count


def pod_specs(obj: Obj) -> Iterator[Obj]:
    """The pod specs inside a workload (Pod, Deployment & co., Job, CronJob)."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Pod":
        yield spec
    elif obj["kind"] == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif "template" in spec:
        yield spec["template"]["spec"]


def containers(pod_spec: Obj) -> Iterator[Obj]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec.get("containers", [])


def split_image(image: str) -> tuple[str, str, str]:
    """(name, ":tag" or "", "@digest" or "")."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon:]
    return name, tag, at + digest


def _set_image(objects: list[Obj], image: Obj, source: Path) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"{source}: images support name, newName, newTag and digest only")
    for obj in objects:
        for pod_spec in pod_specs(obj):
            for container in containers(pod_spec):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "newTag" in image:
                    tag, digest = f":{image['newTag']}", ""
                if "digest" in image:
                    tag, digest = "", f"@{image['digest']}"
                container["image"] = name + tag + digest


# -- generated names ------------------------------------------------------------------------
def kustomize_hash(configmap: Obj) -> str:
    """kustomize's name suffix for a ConfigMap: sha256 of the JSON of its kind, name and data
    (Go's json.Marshal: sorted keys, no spaces, <>& escaped), the first ten hex digits with
    0, 1, 3, a, e replaced so that the suffix never reads as a number or a word.

    The name is hashed as "": kustomize (v5, api/hasher) looks it up with the one-segment
    path "metadata/name", which finds nothing, so the suffix depends on the data alone."""
    document = {"data": configmap.get("data", {}), "kind": "ConfigMap", "name": ""}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escape)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _name_generated(objects: list[Obj]) -> None:
    renamed: dict[str, str] = {}
    for obj in objects:
        if obj.get(_GENERATED):
            old = obj["metadata"]["name"]
            renamed[old] = f"{old}-{kustomize_hash(obj)}"
            obj["metadata"]["name"] = renamed[old]
    if not renamed:
        return
    for obj in objects:
        for pod_spec in pod_specs(obj):
            for volume in pod_spec.get("volumes", []):
                if "configMap" in volume:
                    volume["configMap"]["name"] = renamed.get(
                        volume["configMap"]["name"], volume["configMap"]["name"]
                    )
            for container in containers(pod_spec):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        ref = source["configMapRef"]
                        ref["name"] = renamed.get(ref["name"], ref["name"])
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("configMapKeyRef")
                    if ref is not None:
                        ref["name"] = renamed.get(ref["name"], ref["name"])


# -- validation -----------------------------------------------------------------------------
def is_custom_resource(obj: Obj) -> bool:
    """True for kinds outside the Kubernetes API (no bundled schema), e.g. ServiceMonitor."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def validate(objects: Iterable[Obj], version: str = KUBERNETES_VERSION) -> list[str]:
    """Problems found by validating every built-in object against the strict JSON schemas of
    Kubernetes `version` (unknown fields are errors); custom resources are skipped."""
    import kubernetes_validate.utils as validator  # heavy (schemas): only when validating

    problems = []
    for obj in objects:
        if is_custom_resource(obj):
            continue
        try:
            validator.validate(obj, version, strict=True)
        except validator.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}")
        except validator.SchemaNotFoundError as error:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    return problems


def to_yaml(objects: Iterable[Obj]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("overlays", nargs="+", type=Path, help="kustomization directories")
    parser.add_argument(
        "--validate", action="store_true", help=f"check against Kubernetes {KUBERNETES_VERSION}"
    )
    parser.add_argument("--out", type=Path, help="write OUT/<overlay>.yaml instead of printing")
    args = parser.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        try:
            objects = render(overlay)
        except (RenderError, OSError, yaml.YAMLError) as error:
            print(f"{overlay}: {error}", file=sys.stderr)
            failed = True
            continue
        if args.validate:
            problems = validate(objects)
            for problem in problems:
                print(f"{overlay}: {problem}", file=sys.stderr)
            failed = failed or bool(problems)
            skipped = sum(1 for obj in objects if is_custom_resource(obj))
            print(
                f"{overlay}: {len(objects)} objects, {len(problems)} problems "
                f"(Kubernetes {KUBERNETES_VERSION}; {skipped} custom resources not schema-checked)",
                file=sys.stderr,
            )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{overlay.resolve().name}.yaml").write_text(to_yaml(objects), encoding="utf-8")
        else:
            sys.stdout.write(to_yaml(objects) if len(args.overlays) == 1 else f"---\n{to_yaml(objects)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
