"""A SIGKILLed driver's local Ray is stopped by the next command: by the ids its driver recorded,
and never a process that only reuses a recorded pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tuning.trials import runner
from tuning.tracking.liveness import pid_namespace

DRIVER = """
import os, sys, time
from tuning.options import ClusterOptions, keep_local_ray_on_loopback
cluster = ClusterOptions(storage=sys.argv[1])
keep_local_ray_on_loopback(cluster)
from tuning.trials.runner import init_ray
init_ray(cluster)
print("READY", os.getpid(), flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def _driver(tmp_path, then: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the records of this test only
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "ray_results"), then], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.e2e
def test_the_next_driver_stops_what_a_sigkilled_drivers_ray_left(tmp_path):
    driver = _driver(tmp_path, "wait")
    try:
        line = ""
        while not line.startswith("READY"):
            line = driver.stdout.readline()
            assert line or driver.poll() is None, "driver exited before its Ray started"
        record = json.loads((tmp_path / "cache" / "fer-tune" / "ray" / f"ray-{driver.pid}.json").read_text())
        names = {p["name"]: p["pid"] for p in record["processes"]}
        assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= set(names)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 20
    # Ray's direct children die with it (fate sharing), on a loaded machine seconds later; whatever is
    # still on its way out then, the reaper below must stop as well (it did: gcs_server once, under load).
    while (_running(names["raylet"]) or _running(names["gcs_server"])) and time.time() < deadline:
        time.sleep(0.2)
    # What Ray leaves (ray-project/ray#52385). Where its agents are gone already (a Ray that fixed it, or a
    # slow machine where they finished exiting), there is nothing left for this test to see reaped.
    if not (_running(names["ray::DashboardAgent"]) or _running(names["ray::RuntimeEnvAgent"])):
        pytest.skip("the dead driver's Ray agents exited by themselves: nothing left to reap")

    nxt = _driver(tmp_path, "exit")  # the next command: its init_ray reaps, then starts its own Ray
    out = nxt.communicate(timeout=300)[0]
    assert nxt.returncode == 0, out[-3000:]
    # The agents at least (Ray's workers may still be on their way out).
    assert re.search(rf"stopped [2-9] Ray process\(es\) left by a dead driver \(ray-{driver.pid}.json\)", out), out
    assert not [p["pid"] for p in record["processes"] if _running(p["pid"])]
    # The dead driver's record is gone; the next one's stays until a later command finds it dead.
    assert [p.name for p in (tmp_path / "cache" / "fer-tune" / "ray").iterdir()] == [f"ray-{nxt.pid}.json"]


def _write(folder, name: str, driver_pid: int, driver_started: float, procs: list[tuple[int, float]], host: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({
        "driver_pid": driver_pid, "driver_started": driver_started, "host": host or socket.gethostname(),
        "pid_ns": pid_namespace(), "processes": [{"pid": p, "started": s, "name": "x"} for p, s in procs]}))


def test_only_recorded_processes_of_dead_drivers_are_stopped(tmp_path):
    """A live driver's Ray, a reused pid, another host's record: untouched. A dead driver's: stopped."""
    folder = tmp_path / "records"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    try:
        started = [psutil.Process(s.pid).create_time() for s in sleepers]
        me = psutil.Process()
        _write(folder, "ray-1.json", dead_pid, 1.0, [(sleepers[0].pid, started[0])])  # a dead driver's: stopped
        _write(folder, "ray-2.json", dead_pid, 1.0, [(sleepers[1].pid, started[1] - 100)])  # pid reused since
        _write(folder, "ray-3.json", me.pid, me.create_time(), [(sleepers[2].pid, started[2])])  # driver alive
        _write(folder, "ray-4.json", dead_pid, 1.0, [(sleepers[3].pid, started[3])], host="elsewhere")
        (folder / "ray-5.json").write_text("not json")

        assert runner.reap_dead_drivers_ray(folder, timeout=2) == [sleepers[0].pid]
        assert sleepers[0].wait(timeout=5) == -signal.SIGTERM
        assert all(s.poll() is None for s in sleepers[1:])
        assert sorted(p.name for p in folder.iterdir()) == ["ray-3.json", "ray-4.json"]
        assert runner.reap_dead_drivers_ray(folder, timeout=2) == []
    finally:
        for s in sleepers:
            s.kill()
            s.wait()


def test_a_process_that_ignores_sigterm_is_killed(tmp_path):
    folder = tmp_path / "records"
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                                      "print(1, flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        stubborn.stdout.readline()  # SIGTERM is ignored from here on
        _write(folder, "ray-1.json", 2**22 + 1, 1.0, [(stubborn.pid, psutil.Process(stubborn.pid).create_time())])
        t = time.time()
        assert runner.reap_dead_drivers_ray(folder, timeout=1) == [stubborn.pid]
        assert stubborn.wait(timeout=5) == -signal.SIGKILL and time.time() - t < 5
    finally:
        stubborn.kill()
        stubborn.wait()
