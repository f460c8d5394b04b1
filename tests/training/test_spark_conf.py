"""Extra Spark settings for `recsys build --engine spark` (RECSYS_SPARK_CONF): parsed strictly,
refused without the Spark engine, handed to the Spark session, and recorded by name only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.commands.build import spark_conf
from recsys.errors import UsageError
from training import core_builder, spark_cf
from training.core_builder import CoreConfig
from training.encode import Interactions

ROOT = Path(__file__).resolve().parents[2]


def test_one_setting_a_line_in_order_with_comments_blanks_and_equals_in_values() -> None:
    text = """
        # the executors
        spark.executor.instances = 4
        spark.executor.extraJavaOptions=-Da=b -Dc=d

        spark.kubernetes.driver.pod.name=build-0-x7k2p
    """
    assert spark_conf(text) == (
        ("spark.executor.instances", "4"),
        ("spark.executor.extraJavaOptions", "-Da=b -Dc=d"),
        ("spark.kubernetes.driver.pod.name", "build-0-x7k2p"),
    )
    assert spark_conf("") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "spark.executor.instances",
            "RECSYS_SPARK_CONF line 1: expected key=value, got 'spark.executor.instances'",
        ),
        ("spark.a=1\n=2", "RECSYS_SPARK_CONF line 2: expected key=value, got '=2'"),
        ("executor.instances=4", "RECSYS_SPARK_CONF line 1: 'executor.instances' is not a Spark setting"),
        ("spark.master=local[2]", "RECSYS_SPARK_CONF line 1: the master is --spark-master"),
        ("spark.a=1\n\nspark.a=2", "RECSYS_SPARK_CONF line 3: spark.a is set twice"),
    ],
)
def test_bad_lines_are_refused_naming_the_variable_and_the_line(text: str, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        spark_conf(text)
    assert str(raised.value).startswith(message)


def test_the_cli_refuses_spark_settings_without_the_spark_engine() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "build", "--dataset", "ml-100k"],
        env=os.environ | {"RECSYS_SPARK_CONF": "spark.executor.instances=4"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("RECSYS_SPARK_CONF: only with --engine spark")


class SessionStarted(Exception):
    """Raised by the stand-in session factory: what it was given is all this test needs."""


def test_the_core_builder_hands_the_settings_to_the_spark_session(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def session(master: str, **config: str) -> Any:
        seen.update(master=master, config=config)
        raise SessionStarted

    monkeypatch.setattr(spark_cf, "spark_session", session)
    train = Interactions(
        user=np.array([0, 1], np.int32),
        item=np.array([1, 0], np.int32),
        rating=np.array([5.0, 4.0], np.float32),
        time=np.array([1, 2], np.int64),
        liked=np.array([True, True]),
    )
    config = CoreConfig(
        engine="spark",
        spark_master="k8s://https://kubernetes.default.svc",
        spark_conf=(("spark.executor.instances", "4"), ("spark.kubernetes.namespace", "recsys")),
    )
    unused: Any = None  # the session starts before the catalogue or the users are read
    with pytest.raises(SessionStarted):
        core_builder.build_core(train, unused, unused, config, like_threshold=None)
    assert seen == {
        "master": "k8s://https://kubernetes.default.svc",
        "config": {"spark.executor.instances": "4", "spark.kubernetes.namespace": "recsys"},
    }


def test_a_version_records_the_spark_settings_by_name_only() -> None:
    config = CoreConfig(engine="spark", spark_conf=(("spark.hadoop.fs.s3a.secret.key", "hunter2"),))
    recorded = config.recorded()
    assert recorded["spark_conf"] == ["spark.hadoop.fs.s3a.secret.key"]
    assert "hunter2" not in json.dumps(recorded)
    assert recorded["engine"] == "spark"
    assert recorded["neighbors"] == config.neighbors
