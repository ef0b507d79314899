"""Starts N real nubo agents on loopback and measures convergence and idle cost.

Usage: python3 bench/agents.py NUBO_BINARY AGENTS IDLE_SECONDS
Prints a table, then one JSON object as the last line.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from cloud import cli, start, stop, wait

TICKS = os.sysconf("SC_CLK_TCK")


def wait_api(nubo, data_dir, deadline):
    return wait("the agent's API", lambda: cli(nubo, data_dir, "status"), deadline - time.time())


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    nubo, n, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    root = tempfile.mkdtemp(prefix="nubo-bench-")
    dirs = [os.path.join(root, f"node{i + 1}") for i in range(n)]
    procs = []
    try:
        # The cloud's own administrator key, used by every command that signs (NUBO_KEY).
        admin_key = os.path.join(root, "admin.key")
        os.environ["NUBO_KEY"] = admin_key
        subprocess.run([nubo, "init", "--data-dir", dirs[0], "--json", "--admin-key", admin_key],
                       check=True, capture_output=True)
        procs.append(start(nubo, dirs[0]))
        wait_api(nubo, dirs[0], time.time() + 30)
        token = cli(nubo, dirs[0], "invite")["token"]
        t0 = time.time()
        for d in dirs[1:]:
            procs.append(start(nubo, d, token))
        started = time.time() - t0
        for d in dirs[1:]:
            wait_api(nubo, d, time.time() + 60)
        converged = None
        seen = [0] * n
        while time.time() - t0 < 300:
            for i, d in enumerate(dirs):
                if seen[i] < n:
                    try:
                        seen[i] = cli(nubo, d, "status")["members_alive"]
                    except Exception:
                        pass
            if all(s == n for s in seen):
                converged = time.time() - t0
                break
            time.sleep(0.2)
        print(f"{n} agents started in {started:.1f} s; all saw {n} alive after "
              f"{converged:.1f} s" if converged else f"not converged: {seen}")

        # Idle cost: let the cloud settle, then measure over the window.
        time.sleep(10)
        before = [(cpu_seconds(p.pid), cli(nubo, d, "status")["net"]) for p, d in zip(procs, dirs)]
        time.sleep(idle)
        after = [(cpu_seconds(p.pid), cli(nubo, d, "status")["net"]) for p, d in zip(procs, dirs)]
        rss = sorted(rss_bytes(p.pid) for p in procs)
        cpu = sorted((a[0] - b[0]) / idle * 100 for a, b in zip(after, before))
        bytes_out = sorted((a[1]["bytes_out"] - b[1]["bytes_out"]) / idle for a, b in zip(after, before))
        bytes_in = sorted((a[1]["bytes_in"] - b[1]["bytes_in"]) / idle for a, b in zip(after, before))
        frames_out = sorted((a[1]["frames_out"] - b[1]["frames_out"]) / idle for a, b in zip(after, before))
        alive_end = [cli(nubo, d, "status")["members_alive"] for d in dirs]

        # Failure detection: kill -9 one agent; how long until every other sees it gone?
        victim = n // 2
        victim_id = cli(nubo, dirs[victim], "status")["node_id"]
        procs[victim].kill()
        t_kill = time.time()
        noticed = None
        pending = set(i for i in range(n) if i != victim)
        while pending and time.time() - t_kill < 60:
            for i in list(pending):
                try:
                    nodes = cli(nubo, dirs[i], "nodes")
                except Exception:
                    continue
                if any(m["id"] == victim_id and m["state"] == "gone" for m in nodes):
                    pending.discard(i)
            if not pending:
                noticed = time.time() - t_kill
            time.sleep(0.1)

        def med(xs):
            return xs[len(xs) // 2]

        result = {
            "agents": n,
            "converged_secs": round(converged, 2) if converged else None,
            "idle_secs": idle,
            "rss_mib_median": round(med(rss) / 2**20, 1),
            "rss_mib_max": round(rss[-1] / 2**20, 1),
            "cpu_percent_median": round(med(cpu), 2),
            "cpu_percent_max": round(cpu[-1], 2),
            "bytes_out_per_sec_median": round(med(bytes_out)),
            "bytes_in_per_sec_median": round(med(bytes_in)),
            "frames_out_per_sec_median": round(med(frames_out), 1),
            "members_alive_min_at_end": min(alive_end),
            "kill_noticed_by_all_secs": round(noticed, 2) if noticed else None,
        }
        for k, v in result.items():
            print(f"{k:28} {v}")
        print(json.dumps(result))
    finally:
        stop(procs, timeout=5)
        subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
