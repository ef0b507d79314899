"""Where a quiet cloud's bytes go: N nubo agents on loopback, left idle, per message kind.

Usage: python3 bench/idle.py NUBO_BINARY AGENTS IDLE_SECONDS
Starts AGENTS agents, waits until every one sees every one alive, lets them settle for 30 s,
then reads every agent's counters (`nubo status --json`: `net_by_kind` and `net`) before and
after IDLE_SECONDS of idleness. Prints, per message kind, frames and bytes queued per agent per
second (frame headers included, QUIC and UDP headers not), the connections opened per agent
per second (each a handshake of several kB), and the loopback bytes sent per agent per second
(every header included: what bench/serf.sh compares with Serf), and what the overlay did in
the window (neighbours lost, requests unanswered). The last line is JSON.
"""

import json
import sys
import time

from cloud import cli
from serf import POOL, Nubo, lo_tx_bytes, until


def snapshot(cloud):
    statuses = list(POOL.map(lambda d: cli(cloud.binary, d, "status"), cloud.dirs))
    by_kind = {}
    opened = 0
    membership = {}
    for status in statuses:
        for name, count in status.get("membership", {}).items():
            membership[name] = membership.get(name, 0) + count
        for kind, traffic in status["net_by_kind"].items():
            frames, size = by_kind.get(kind, (0, 0))
            by_kind[kind] = (frames + traffic["frames"], size + traffic["bytes"])
        opened += status["net"].get("connections_opened", 0)
    return by_kind, opened, membership, lo_tx_bytes(), time.time()


def main():
    binary, agents, idle = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    cloud = Nubo(binary, agents)
    try:
        cloud.start()
        converged = until(lambda: all(c == agents for c in cloud.alive_counts()), 300)
        if converged is None:
            sys.exit(f"the {agents} agents did not all see each other within 300 s")
        time.sleep(30)
        kinds0, opened0, members0, lo0, t0 = snapshot(cloud)
        time.sleep(idle)
        kinds1, opened1, members1, lo1, t1 = snapshot(cloud)
    finally:
        cloud.stop()
    span = (t1 - t0) * agents
    rows = []
    for kind in sorted(kinds1):
        frames = kinds1[kind][0] - kinds0.get(kind, (0, 0))[0]
        size = kinds1[kind][1] - kinds0.get(kind, (0, 0))[1]
        if frames:
            rows.append({"kind": kind, "frames_per_agent_s": round(frames / span, 4),
                         "bytes_per_agent_s": round(size / span, 1)})
    rows.sort(key=lambda r: -r["bytes_per_agent_s"])
    for row in rows:
        print(f"{row['kind']:>16}: {row['frames_per_agent_s']:>8} frames/s "
              f"{row['bytes_per_agent_s']:>8} B/s per agent")
    result = {
        "agents": agents,
        "idle_s": round(t1 - t0, 1),
        "frame_bytes_per_agent_s": round(sum(r["bytes_per_agent_s"] for r in rows), 1),
        "loopback_bytes_per_agent_s": round((lo1 - lo0) / span, 1),
        "connections_opened_per_agent_s": round((opened1 - opened0) / span, 4),
        "kinds": rows,
        # What the overlay did in the window, summed over the agents (links lost, requests
        # unanswered...): what explains neighbour requests and new connections.
        "membership": {name: count - members0.get(name, 0) for name, count in members1.items()},
    }
    print(f"frames {result['frame_bytes_per_agent_s']} B/s, loopback "
          f"{result['loopback_bytes_per_agent_s']} B/s, "
          f"{result['connections_opened_per_agent_s']} connections opened/s per agent")
    print(f"membership, all agents over the window: {result['membership']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
