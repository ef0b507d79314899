"""Helpers shared by the benchmark scripts: run the nubo CLI, start agents, wait."""

import json
import os
import subprocess
import time


def cli(nubo, data_dir, *args, check=True):
    """`nubo ARGS --data-dir DIR --json`, parsed; None on failure unless `check`."""
    out = subprocess.run([nubo, *args, "--data-dir", data_dir, "--json"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if check:
            raise RuntimeError(f"nubo {args}: {out.stderr.strip()}")
        return None
    return json.loads(out.stdout)


def start(nubo, data_dir, token=None, extra=()):
    """Starts an agent on loopback (it exits with this script)."""
    os.makedirs(data_dir, exist_ok=True)
    env = dict(os.environ, NUBO_LOG="warn")
    env.pop("NUBO_JOIN", None)
    if token:
        env["NUBO_JOIN"] = token
    log = open(os.path.join(data_dir, "agent.log"), "a")
    return subprocess.Popen(
        [nubo, "agent", "--data-dir", data_dir, "--listen", "127.0.0.1:0",
         "--api", "127.0.0.1:0", "--exit-with-parent", *extra],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)


def wait(what, condition, timeout):
    """Seconds until `condition()` holds (exceptions count as not yet)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if condition():
                return time.time() - t0
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def stop(procs, timeout=10):
    """Stops agents: SIGTERM, then SIGKILL for those still running after `timeout`."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


# A static site served by python3, one replica per node it is placed on; the fields are the
# service's name, its replicas, its health check interval and extra lines (an [update]).
SITE = """name = "{name}"
namespace = "bench"

[run]
command = "sh"
args = ["-c", "echo {page} > index.html && exec python3 -m http.server $NUBO_PORT_HTTP --bind 127.0.0.1"]

[resources]
cpu = 0.05
memory = "128MiB"

[placement]
replicas = {replicas}

[ports]
http = 0

[health]
type = "http"
port = "http"
interval = "{interval}"
{extra}
"""


def site(name, replicas, interval="500ms", page="nubo", extra=""):
    """The description of a bench site (see SITE)."""
    return SITE.format(name=name, replicas=replicas, interval=interval, page=page, extra=extra)
