"""nubo and Serf side by side on loopback: N agents of each, interleaved rounds.

Usage: python3 bench/serf.py NUBO_BINARY SERF_BINARY "50,100" IDLE_SECONDS ROUNDS
For each size and round, a cloud of nubo agents and a cluster of Serf agents (defaults,
LAN profile) are started in turn; each reports: time until every agent sees every agent
alive (from the last start), idle bytes sent per agent per second (all loopback traffic,
headers included, over the idle window, divided by the agents: every byte sent on loopback is
sent by one of them), idle CPU (% of a core) and resident memory per agent, and time until
every other agent sees a `kill -9` of one. Prints a table, then one JSON object as the last
line.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from cloud import cli, start, stop

TICKS = os.sysconf("SC_CLK_TCK")
POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8)


def lo_tx_bytes():
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return 0


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


def until(condition, timeout):
    """Seconds until `condition()` holds, or None."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return time.time() - t0
        time.sleep(0.1)
    return None


def idle_cost(pids, seconds):
    before_bytes = lo_tx_bytes()
    before_cpu = [cpu_seconds(p) for p in pids]
    time.sleep(seconds)
    sent = (lo_tx_bytes() - before_bytes) / len(pids) / seconds
    cpu = [(cpu_seconds(p) - c) / seconds * 100 for p, c in zip(pids, before_cpu)]
    rss = [rss_bytes(p) / 2**20 for p in pids]
    return sent, sum(cpu) / len(cpu), sum(rss) / len(rss)


class Nubo:
    name = "nubo"

    def __init__(self, binary, n):
        self.binary, self.n = binary, n
        self.root = tempfile.mkdtemp(prefix="nubo-serf-bench-")
        self.dirs = [os.path.join(self.root, f"node{i + 1}") for i in range(n)]
        self.procs = []

    def start(self):
        subprocess.run([self.binary, "init", "--data-dir", self.dirs[0], "--json",
                        "--admin-key", os.path.join(self.root, "admin.key")],
                       check=True, capture_output=True)
        self.procs.append(start(self.binary, self.dirs[0]))
        until(lambda: cli(self.binary, self.dirs[0], "status", check=False) is not None, 30)
        token = cli(self.binary, self.dirs[0], "invite")["token"]
        for d in self.dirs[1:]:
            self.procs.append(start(self.binary, d, token))

    def alive_counts(self):
        def count(d):
            status = cli(self.binary, d, "status", check=False)
            return status["members_alive"] if status else 0
        return list(POOL.map(count, self.dirs))

    def sees_gone(self, index):
        victim = cli(self.binary, self.dirs[index], "status")["node_id"]

        def check():
            def gone(d):
                nodes = cli(self.binary, d, "nodes", check=False) or []
                return any(n["id"] == victim and n["state"] != "alive" for n in nodes)
            others = [d for i, d in enumerate(self.dirs) if i != index]
            return all(POOL.map(gone, others))
        return check

    def stop(self):
        stop(self.procs)
        shutil.rmtree(self.root, ignore_errors=True)


class Serf:
    name = "serf"

    def __init__(self, binary, n, base_port=27946):
        self.binary, self.n = binary, n
        self.ports = [base_port + 2 * i for i in range(n)]
        self.procs = []

    def start(self):
        for i, port in enumerate(self.ports):
            args = [self.binary, "agent", f"-node=s{i}", f"-bind=127.0.0.1:{port}",
                    f"-rpc-addr=127.0.0.1:{port + 1}", "-log-level=err"]
            if i > 0:
                args.append(f"-join=127.0.0.1:{self.ports[0]}")
            self.procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
            if i == 0:
                time.sleep(0.5)

    def members(self, port, status):
        out = subprocess.run([self.binary, "members", f"-rpc-addr=127.0.0.1:{port + 1}",
                              f"-status={status}"], capture_output=True, text=True, timeout=20)
        return out.stdout.split("\n") if out.returncode == 0 else []

    def alive_counts(self):
        return list(POOL.map(lambda p: len([l for l in self.members(p, "alive") if l]),
                             self.ports))

    def sees_gone(self, index):
        victim = f"s{index}"

        def check():
            def failed(p):
                return any(l.split() and l.split()[0] == victim
                           for l in self.members(p, "failed"))
            others = [p for i, p in enumerate(self.ports) if i != index]
            return all(POOL.map(failed, others))
        return check

    def stop(self):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def round_of(system, idle):
    system.start()
    t0 = time.time()
    converged = until(lambda: all(c == system.n for c in system.alive_counts()), 300)
    time.sleep(10)
    pids = [p.pid for p in system.procs]
    sent, cpu, rss = idle_cost(pids, idle)
    victim = system.n // 2
    # Built before the kill: nubo's needs the victim's node id, which only it can tell.
    all_see_gone = system.sees_gone(victim)
    system.procs[victim].send_signal(signal.SIGKILL)
    system.procs[victim].wait()
    killed = time.time()
    detected = until(all_see_gone, 120)
    system.stop()
    return {
        "system": system.name,
        "agents": system.n,
        "converged_s": round(converged, 2) if converged is not None else None,
        "idle_bytes_per_agent_s": round(sent, 1),
        "idle_cpu_percent": round(cpu, 3),
        "rss_mib": round(rss, 1),
        "kill_seen_by_all_s": round(detected, 2) if detected is not None else None,
        "started": round(t0, 1),
        "measured_in_s": round(time.time() - killed, 1),
    }


def main():
    nubo, serf, sizes, idle, rounds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    results = []
    for _ in range(rounds):
        for n in [int(s) for s in sizes.split(",")]:
            for system in (Serf(serf, n), Nubo(nubo, n)):
                result = round_of(system, idle)
                results.append(result)
                print(f"{result['system']:>5} {n:>4} agents: all see all {result['converged_s']} s, "
                      f"idle {result['idle_bytes_per_agent_s']} B/s and "
                      f"{result['idle_cpu_percent']}% CPU per agent, RSS {result['rss_mib']} MiB, "
                      f"kill seen by all after {result['kill_seen_by_all_s']} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
