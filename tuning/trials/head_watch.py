"""A driver joined to a Ray cluster notices its head going away and says so in one line.

Ray's own client waits 60 s for a lost GCS, then its C++ core ends the process with exit code 1 and
"Failed to connect to GCS within 60 seconds ... The program will terminate" (seen after
`cluster.local down` mid-stage): no word of what was lost or how to continue. The watch connects to
the head's GCS port every `EVERY_S` seconds; after `MISSES` failures in a row (well inside Ray's 60 s)
it prints one line with the command that continues, and ends the process with exit code 2. Tune
saved its state at the last checkpoint, as for a killed driver, and the next command settles the runs.
"""

from __future__ import annotations

import os
import sys
import threading

from fer_model.errors import UserError
from tuning.options import check_ray_address

EVERY_S = 5.0
MISSES = 4  # 20 s without the head: gone, not a blip (a head restart takes longer and loses the cluster anyway)


def head_answers(address: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the GCS at `address` (``host:port``) opens within `timeout` seconds."""
    try:
        check_ray_address(address, timeout=timeout)  # the check --address gets before anything starts
        return True
    except UserError:
        return False


def watch_head(address: str, continue_with: str, stop: threading.Event) -> threading.Thread:
    """Start the watch of the GCS at `address` (until `stop` is set); returns its daemon thread."""
    def run() -> None:
        misses = 0
        while not stop.wait(EVERY_S):
            misses = 0 if head_answers(address) else misses + 1
            if misses >= MISSES:
                print(f"error: the Ray cluster's head at {address} stopped answering ({misses * EVERY_S:.0f} s); "
                      f"once the cluster is back (python -m cluster.local up), continue with: {continue_with}",
                      file=sys.stderr, flush=True)
                os._exit(2)  # Ray's core would end the process anyway, at 60 s, with exit 1 and no word of ours

    thread = threading.Thread(target=run, name="ray-head-watch", daemon=True)
    thread.start()
    return thread
