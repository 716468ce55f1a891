"""`fer_model.cli`: SIGTERM stops a command as Ctrl-C does, whatever SIGINT's disposition it started with."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

# A command that waits, as a driver waits on a retrying request; run_cli turns a stop into exit 130.
WAITER = """
import sys, time
from fer_model.cli import run_cli
def main(argv):
    print("waiting", flush=True)
    time.sleep(60)
sys.exit(run_cli(main, []))
"""


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"])
def test_sigterm_is_exit_130_even_when_sigint_is_ignored(sigint):
    # `cmd &` in a non-interactive shell starts cmd with SIGINT ignored: SIGTERM used to be passed on as a
    # SIGINT, which such a process never received, so a driver went on with its ~30 s of retries (seen in CI).
    proc = subprocess.Popen([sys.executable, "-c", WAITER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    assert proc.stdout.readline().strip() == "waiting"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
