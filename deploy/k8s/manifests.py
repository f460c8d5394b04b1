"""Render the kustomize overlays under deploy/k8s with `kubectl kustomize`, and validate the
result against the Kubernetes schemas offline.

    python deploy/k8s/manifests.py deploy/k8s/overlays/prod                # YAML on stdout
    python deploy/k8s/manifests.py --validate --out build/k8s deploy/k8s/overlays/*

kustomize itself renders (kubectl >= 1.27 carries kustomize v5), so what is checked is what
`kubectl apply -k` applies. Validation uses the strict JSON schemas bundled in the
`kubernetes-validate` package (no network): unknown fields and wrong types are errors.
Custom resources have no bundled schema; the kinds in `CUSTOM_RESOURCES` are skipped by
name, and any other kind without a schema is reported, so a typo in `apiVersion` or `kind`
cannot slip through as "custom".
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUBERNETES_VERSION = "1.30"  # the oldest minor the manifests promise to work on (docs/operations.md)
# (apiVersion, kind) of the custom resources the components use: no offline schema exists.
CUSTOM_RESOURCES = frozenset({("monitoring.coreos.com/v1", "ServiceMonitor")})
KUSTOMIZE_TIMEOUT_SECONDS = 120


class RenderError(RuntimeError):
    """kubectl is missing, or kustomize refused the overlay (its message is kept)."""


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path) -> list[Obj]:
    """The objects `kubectl kustomize DIRECTORY` renders, in its order."""
    binary = kubectl()
    if binary is None:
        raise RenderError("kubectl is not installed (kubectl >= 1.27 carries kustomize v5)")
    result = subprocess.run(
        [binary, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=KUSTOMIZE_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory}: {result.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


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


def is_custom_resource(obj: Obj) -> bool:
    return (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_RESOURCES


def validate(objects: Iterable[Obj], version: str = KUBERNETES_VERSION) -> list[str]:
    """Problems found by validating every object but the known custom resources against the
    strict JSON schemas of Kubernetes `version` (unknown fields are errors)."""
    import kubernetes_validate.utils as validator  # heavy (schemas): only when validating

    problems = []
    for obj in objects:
        if is_custom_resource(obj):
            continue
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            validator.validate(obj, version, strict=True)
        except validator.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{name}: {where}: {error.message}")
        except validator.SchemaNotFoundError as error:
            problems.append(f"{name}: {error.message}")
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
