"""Rolling update of one HTTP service over 10 agents: update time and the longest outage.

Usage: python3 bench/update.py NUBO_BINARY REPLICAS
Prints a table, then one JSON object as the last line.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from cloud import cli, site, start, stop, wait

AGENTS = 10
POLL = 0.05



def answers(port):
    """Whether the instance on `port` serves a page."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as s:
            s.settimeout(0.5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data.startswith(b"HTTP/1.0 200")
    except OSError:
        return False


class Watch:
    """Learns the service's addresses from `nubo ps` and polls them all every 50 ms."""

    def __init__(self, nubo, data_dir):
        self.ports = set()
        self.stop = False
        self.rounds = 0
        self.dark = 0
        self.gap = 0.0
        self.last_answer = None
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.learn, args=(nubo, data_dir)),
                        threading.Thread(target=self.poll)]
        for t in self.threads:
            t.start()

    def learn(self, nubo, data_dir):
        while not self.stop:
            for i in cli(nubo, data_dir, "ps", "bench/site", check=False) or []:
                with self.lock:
                    self.ports.update(i["ports"].values())
            time.sleep(0.25)

    def poll(self):
        while not self.stop:
            with self.lock:
                ports = sorted(self.ports)
            now = time.time()
            if any(answers(p) for p in ports):
                if self.last_answer is not None:
                    self.gap = max(self.gap, now - self.last_answer)
                self.last_answer = now
            elif ports:
                self.dark += 1
            self.rounds += 1
            time.sleep(POLL)

    def close(self):
        self.stop = True
        for t in self.threads:
            t.join()


def deploy(nubo, admin, path):
    t0 = time.time()
    out = subprocess.run([nubo, "deploy", path, "--wait", "10m", "--data-dir", admin],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return time.time() - t0


def main():
    nubo, replicas = sys.argv[1], int(sys.argv[2])
    root = tempfile.mkdtemp(prefix="nubo-bench-")
    dirs = [os.path.join(root, f"node{i + 1}") for i in range(AGENTS)]
    procs = []
    results = []
    try:
        # The cloud's own administrator key, used by every command that signs (NUBO_KEY).
        admin_key = os.path.join(root, "admin.key")
        os.environ["NUBO_KEY"] = admin_key
        subprocess.run([nubo, "init", "--data-dir", dirs[0], "--json", "--admin-key", admin_key],
                       check=True, capture_output=True)
        procs.append(start(nubo, dirs[0]))
        wait("the first agent", lambda: cli(nubo, dirs[0], "status"), 30)
        token = cli(nubo, dirs[0], "invite")["token"]
        for d in dirs[1:]:
            procs.append(start(nubo, d, token))
        wait("convergence", lambda: all(
            (cli(nubo, d, "status", check=False) or {}).get("members_alive") == AGENTS
            for d in dirs), 120)
        admin = dirs[0]
        for label, update in [("defaults (min_healthy_time 10s)", "grace = \"300ms\""),
                              ("min_healthy_time 1s",
                               'grace = "300ms"\n[update]\nmin_healthy_time = "1s"')]:
            path = os.path.join(root, "site.toml")
            pages = ["v1", "v2"]
            with open(path, "w") as f:
                f.write(site("site", replicas, page=pages[0], extra=update))
            first = deploy(nubo, admin, path)
            watch = Watch(nubo, admin)
            time.sleep(2)
            with open(path, "w") as f:
                f.write(site("site", replicas, page=pages[1], extra=update))
            took = deploy(nubo, admin, path)
            time.sleep(1)
            watch.close()
            results.append({"settings": label, "first_deploy_s": round(first, 2),
                            "update_s": round(took, 2), "longest_gap_s": round(watch.gap, 3),
                            "rounds": watch.rounds, "rounds_unanswered": watch.dark})
            cli(nubo, admin, "rm", "bench/site")
            wait("the service gone", lambda: not cli(nubo, admin, "ps", "bench/site"), 60)
            time.sleep(2)
    finally:
        stop(procs)
    print(f"rolling update of {replicas} replicas over {AGENTS} agents, max_parallel 1, "
          f"polled every {int(POLL * 1000)} ms")
    print(f"{'settings':<34}{'first deploy':>14}{'update':>10}{'unanswered':>12}"
          f"{'longest interval':>18}")
    for r in results:
        print(f"{r['settings']:<34}{r['first_deploy_s']:>13.1f}s{r['update_s']:>9.1f}s"
              f"{r['rounds_unanswered']:>6} of {r['rounds']:<5}"
              f"{r['longest_gap_s'] * 1000:>12.0f} ms")
    print(json.dumps({"agents": AGENTS, "replicas": replicas, "results": results}))


if __name__ == "__main__":
    main()
