"""Recovery and deployment times of services on a 10-agent loopback cloud.

Usage: python3 bench/services.py NUBO_BINARY TRIALS SERVICES
Prints a table, then one JSON object as the last line.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from cloud import cli, site, start, stop, wait

AGENTS = 10
EXTRA = ("--max-instances", "64")



def instance_pids(data_dir):
    try:
        with open(os.path.join(data_dir, "instances", "instances.json")) as f:
            return [r["pid"] for r in json.load(f)]
    except (OSError, ValueError):
        return []


def main():
    nubo, trials, services = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    root = tempfile.mkdtemp(prefix="nubo-bench-")
    dirs = [os.path.join(root, f"node{i + 1}") for i in range(AGENTS)]
    procs = {}
    try:
        # The cloud's own administrator key, used by every command that signs (NUBO_KEY).
        admin_key = os.path.join(root, "admin.key")
        os.environ["NUBO_KEY"] = admin_key
        subprocess.run([nubo, "init", "--data-dir", dirs[0], "--json", "--admin-key", admin_key],
                       check=True, capture_output=True)
        procs[0] = start(nubo, dirs[0], extra=EXTRA)
        wait("the first agent", lambda: cli(nubo, dirs[0], "status"), 30)
        token = cli(nubo, dirs[0], "invite")["token"]
        for i in range(1, AGENTS):
            procs[i] = start(nubo, dirs[i], token, EXTRA)
        wait("convergence", lambda: all(
            (cli(nubo, d, "status", check=False) or {}).get("members_alive") == AGENTS
            for d in dirs), 120)
        admin = dirs[0]
        ids = [cli(nubo, d, "status")["node_id"][:8] for d in dirs]

        # Recovery: default settings, one service of 3 replicas.
        site_path = os.path.join(root, "site.toml")
        with open(site_path, "w") as f:
            f.write(site("site", 3))
        cli(nubo, admin, "deploy", site_path, "--detach")

        def healthy(service):
            return {i["node"] for i in cli(nubo, admin, "ps", service)
                    if i["health"] == "healthy"}

        wait("3 healthy replicas", lambda: len(healthy("bench/site")) == 3, 60)
        recoveries = []
        for trial in range(trials):
            hosts = healthy("bench/site")
            victim = next(i for i in range(1, AGENTS) if ids[i] in hosts)
            pids = instance_pids(dirs[victim])
            procs[victim].kill()
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            t_kill = time.time()
            wait("a replacement", lambda: (lambda h: len(h) == 3 and ids[victim] not in h)(
                healthy("bench/site")), 120)
            recoveries.append(time.time() - t_kill)
            print(f"trial {trial + 1}: replacement healthy {recoveries[-1]:.2f} s after kill -9")
            procs[victim].wait()
            procs[victim] = start(nubo, dirs[victim], extra=EXTRA)
            wait("the restarted agent", lambda: all(
                (cli(nubo, d, "status", check=False) or {}).get("members_alive") == AGENTS
                for d in dirs), 120)
            time.sleep(3)
        cli(nubo, admin, "rm", "bench/site")

        # Deployment: SERVICES services of 2 replicas each.
        files = []
        for k in range(services):
            path = os.path.join(root, f"s{k}.toml")
            with open(path, "w") as f:
                f.write(site(f"s{k}", 2, interval="2s"))
            files.append(path)
        t0 = time.time()
        for path in files:
            cli(nubo, admin, "deploy", path, "--detach")
        deployed = time.time() - t0
        wanted = services * 2

        names = {f"bench/s{k}" for k in range(services)}

        def all_healthy():
            ps = cli(nubo, admin, "ps")
            return sum(1 for i in ps if i["health"] == "healthy"
                       and i["service"] in names) == wanted

        healthy_after = wait(f"{wanted} healthy instances", all_healthy, 600) + deployed
        print(f"{services} services x 2: deploy commands took {deployed:.1f} s; "
              f"all {wanted} instances healthy after {healthy_after:.1f} s")

        result = {
            "agents": AGENTS,
            "trials": trials,
            "recovery_secs_median": round(statistics.median(recoveries), 2),
            "recovery_secs_max": round(max(recoveries), 2),
            "recovery_secs_min": round(min(recoveries), 2),
            "services": services,
            "deploy_commands_secs": round(deployed, 1),
            "all_healthy_secs": round(healthy_after, 1),
        }
        for k, v in result.items():
            print(f"{k:24} {v}")
        print(json.dumps(result))
    finally:
        stop(procs.values())
        time.sleep(1)
        for d in dirs:
            for pid in instance_pids(d):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
        subprocess.run(["rm", "-rf", root])


if __name__ == "__main__":
    main()
