"""The example alert rules (config/shmbroker-alerts.yml), checked by promtool:
valid rules, and each alert fires on the series it is for, and not otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "config" / "shmbroker-alerts.yml"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian: apt-get install prometheus)",
)

# promtool's unit-test format: input series, then the alerts expected at a time
UNIT_TESTS = """
rule_files: [RULES]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'shmbroker_up{instance="a"}'
        values: '1 1 0 0 0 0'
      - series: 'shmbroker_shm_used_bytes{instance="a",path="/dev/shm"}'
        values: '50 95 95 95 95 95 95 95'
      - series: 'shmbroker_shm_size_bytes{instance="a",path="/dev/shm"}'
        values: '100 100 100 100 100 100 100 100'
      - series: 'shmbroker_uid_bytes{instance="a",uid="1000"}'
        values: '96x8'
      - series: 'shmbroker_uid_quota_bytes{instance="a",uid="1000"}'
        values: '100x8'
      - series: 'shmbroker_uid_bytes{instance="a",uid="1001"}'
        values: '96x8'
      - series: 'shmbroker_uid_quota_bytes{instance="a",uid="1001"}'
        values: '0x8'
      - series: 'shmbroker_journal_write_failures_total{instance="a"}'
        values: '0 0 0 2 2 2 2 2'
    alert_rule_test:
      - eval_time: 1m
        alertname: ShmbrokerDown
        exp_alerts: []
      - eval_time: 4m
        alertname: ShmbrokerDown
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
            exp_annotations:
              summary: "shmbrokerd on a does not answer the exporter"
              description: "The exporter's log (journalctl -u shmbroker-exporter) says why."
      - eval_time: 3m
        alertname: ShmbrokerDevShmNearlyFull
        exp_alerts: []
      - eval_time: 7m
        alertname: ShmbrokerDevShmNearlyFull
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, path: /dev/shm}
            exp_annotations:
              summary: "/dev/shm on a is 95% full"
              description: "Creates will soon fail with ENOSPC."
      - eval_time: 7m
        alertname: ShmbrokerUidNearByteQuota
        exp_alerts:
          - exp_labels: {severity: warning, instance: a, uid: "1000"}
            exp_annotations:
              summary: "uid 1000 holds 96% of its byte quota"
              description: "Its next creates will fail with EDQUOT."
      - eval_time: 2m
        alertname: ShmbrokerJournalWriteFailures
        exp_alerts: []
      - eval_time: 4m
        alertname: ShmbrokerJournalWriteFailures
        exp_alerts:
          - exp_labels: {severity: critical, instance: a}
            exp_annotations:
              summary: "shmbrokerd on a cannot write its state journal"
              description: "Changes are refused until it can be written (docs/operations.md)."
"""


def test_alert_rules_are_valid() -> None:
    res = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout


def test_alerts_fire_on_the_series_they_are_for(tmp_path: Path) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(UNIT_TESTS.replace("RULES", str(RULES)))
    res = subprocess.run(
        ["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
