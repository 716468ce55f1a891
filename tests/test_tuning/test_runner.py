"""The Ray a stage starts for itself listens on the loopback interface only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # its one test starts a local Ray (see pyproject's markers)

SCRIPT = """
import json, os, psutil
from tuning.options import ClusterOptions, keep_local_ray_on_loopback
keep_local_ray_on_loopback(ClusterOptions())
from tuning.trials.runner import init_ray
import ray
init_ray(ClusterOptions(dashboard=DASHBOARD))
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
procs = [psutil.Process()] + psutil.Process().children(recursive=True)
listening = []
for p in procs:
    try:
        listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print(json.dumps(listening))
ray.shutdown()
"""


@pytest.mark.parametrize("dashboard", [False, True])
def test_a_local_ray_listens_on_loopback_only(tmp_path, dashboard):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    script = SCRIPT.replace("DASHBOARD", str(dashboard))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    url = re.search(r"Ray dashboard: http://([\d.]+):(\d+)", out.stdout)
    names = {name for name, _, _ in listening}
    assert "gcs_server" in names and "raylet" in names, listening
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    if dashboard:  # asked for: there, on loopback
        assert url and url[1] == "127.0.0.1" and int(url[2]) in {port for _, _, port in listening}, out.stdout
    else:  # none unless asked
        assert url is None and 8265 not in {port for _, _, port in listening}, out.stdout
