"""The cluster a build belongs to, from the environment: TF_CONFIG, or the Indexed Job's
RECSYS_TF_WORKER_HOSTS + JOB_COMPLETION_INDEX (the contract the Kubernetes manifests use)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from recsys.cli import main
from training.distributed import ClusterError, ClusterSpec, resolve_cluster

HOSTS = "10.0.0.1:2222,10.0.0.2:2222,10.0.0.3:2222"


def tf_config(cluster: dict[str, Any], kind: str = "worker", index: Any = 0) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})}


def test_nothing_configured_or_one_worker_is_a_single_process_build() -> None:
    assert resolve_cluster({}) is None
    assert resolve_cluster({"TF_CONFIG": "  ", "JOB_COMPLETION_INDEX": "3"}) is None
    assert resolve_cluster(tf_config({"worker": ["localhost:2222"]})) is None
    assert (
        resolve_cluster({"RECSYS_TF_WORKER_HOSTS": "trainer-0.trainer:2222", "JOB_COMPLETION_INDEX": "0"})
        is None
    )


def test_tf_config_workers_in_order_and_worker_zero_is_the_chief() -> None:
    hosts = ["a:1", "b:2", "c:3"]
    second = resolve_cluster(tf_config({"worker": hosts}, index=1))
    assert second == ClusterSpec(("a:1", "b:2", "c:3"), 1)
    assert not second.is_chief
    assert second.size == 3
    first = resolve_cluster(tf_config({"worker": hosts}, index=0))
    assert first is not None
    assert first.is_chief


def test_a_chief_job_is_worker_zero() -> None:
    cluster = {"chief": ["boss:1"], "worker": ["w0:2", "w1:3"]}
    chief = resolve_cluster(tf_config(cluster, "chief", 0))
    assert chief == ClusterSpec(("boss:1", "w0:2", "w1:3"), 0)
    assert chief.is_chief
    assert resolve_cluster(tf_config(cluster, "worker", 1)) == ClusterSpec(("boss:1", "w0:2", "w1:3"), 2)


def test_the_indexed_job_contract() -> None:
    environ = {"RECSYS_TF_WORKER_HOSTS": f" {HOSTS} ", "JOB_COMPLETION_INDEX": "2"}
    spec = resolve_cluster(environ)
    assert spec == ClusterSpec(("10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"), 2)
    # TF_CONFIG, when set, is the cluster (the Indexed Job's variables are ignored).
    both = {**environ, **tf_config({"worker": ["x:1", "y:1"]}, index=0)}
    assert resolve_cluster(both) == ClusterSpec(("x:1", "y:1"), 0)


@pytest.mark.parametrize(
    ("environ", "variable", "problem"),
    [
        ({"TF_CONFIG": "{cluster"}, "TF_CONFIG", "not JSON"),
        ({"TF_CONFIG": "[]"}, "TF_CONFIG", '"cluster" and "task"'),
        (tf_config({"worker": ["a:1", "b:1"], "ps": ["p:1"]}), "TF_CONFIG", "['ps'] are not supported"),
        (tf_config({"worker": ["a:1", "a:1"]}), "TF_CONFIG", "listed twice"),
        (tf_config({"worker": ["a", "b:1"]}), "TF_CONFIG", "cluster.worker: expected host:port, got 'a'"),
        (tf_config({"worker": ["a:1", "b:99999"]}), "TF_CONFIG", "got 'b:99999'"),
        (tf_config({"worker": "a:1,b:1"}), "TF_CONFIG", "expected a list"),
        (tf_config({"worker": []}), "TF_CONFIG", "no worker hosts"),
        (tf_config({"worker": ["a:1", "b:1"]}, index=2), "TF_CONFIG", "task.index: 2 is not one of the 2"),
        (
            tf_config({"worker": ["a:1", "b:1"]}, index="1"),
            "TF_CONFIG",
            "task.index: expected a whole number",
        ),
        (tf_config({"worker": ["a:1", "b:1"]}, kind="chief"), "TF_CONFIG", "task.type"),
        (tf_config({"worker": ["a:1", "b:1"]}, kind="evaluator"), "TF_CONFIG", "task.type"),
        (tf_config({"chief": ["a:1", "b:1"], "worker": ["c:1"]}), "TF_CONFIG", "at most one host"),
        ({"RECSYS_TF_WORKER_HOSTS": HOSTS}, "JOB_COMPLETION_INDEX", "required with RECSYS_TF_WORKER_HOSTS"),
        ({"RECSYS_TF_WORKER_HOSTS": HOSTS, "JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX", "'one'"),
        ({"RECSYS_TF_WORKER_HOSTS": HOSTS, "JOB_COMPLETION_INDEX": "3"}, "JOB_COMPLETION_INDEX", "of the 3"),
        (
            {"RECSYS_TF_WORKER_HOSTS": HOSTS, "JOB_COMPLETION_INDEX": "-1"},
            "JOB_COMPLETION_INDEX",
            "-1 is not",
        ),
        ({"RECSYS_TF_WORKER_HOSTS": "a:1,,b:1", "JOB_COMPLETION_INDEX": "0"}, "RECSYS_TF_WORKER_HOSTS", "''"),
        (
            {"RECSYS_TF_WORKER_HOSTS": "a:1,b:x", "JOB_COMPLETION_INDEX": "0"},
            "RECSYS_TF_WORKER_HOSTS",
            "'b:x'",
        ),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], variable: str, problem: str) -> None:
    with pytest.raises(ClusterError) as raised:
        resolve_cluster(environ)
    message = str(raised.value)
    assert message.startswith(f"{variable}: ")
    assert problem in message
    assert raised.value.variable == variable


def test_recsys_build_rejects_a_bad_cluster_before_reading_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("RECSYS_TF_WORKER_HOSTS", HOSTS)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "7")
    # No such data directory either: the cluster is checked first.
    code = main(
        ["build", "--dataset", "ml-100k", "--data-dir", "/nonexistent", "--store", "/nonexistent/store"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "recsys build: error: JOB_COMPLETION_INDEX: 7 is not the index of one of the 3 hosts" in error
