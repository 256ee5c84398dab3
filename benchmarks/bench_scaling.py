"""Scaling benchmark: how fast hxb goes from no instance to 100 running at once, and what it
serves at 100 concurrent clients, each beside a baseline measured in the same run.

  scale-out    100 invocations sent at once to a function with no instance; each handler
               records when it started and holds its instance for a while, so all 100 must
               run concurrently. Figure: time from sending to the 100th handler running.
               Baseline: 100 fresh `python3 -S -I` interpreters spawned at once, each
               reporting when it runs (a platform that starts a process per instance, with
               no isolation).
  throughput   requests/s with 100 concurrent keep-alive clients (wrk) on the warm function
               (100 = the team plan's default concurrency: no throttling), vs. a minimal
               uvicorn app returning the same JSON.

Needs wrk for throughput. Usage: .venv/bin/python benchmarks/bench_scaling.py [--instances 100]
Prints a table and one JSON line. Loopback only; everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import _zip, free_port, log, start_baseline, start_hxb, stop, throughput

HOLD_HANDLER = (
    "import time\n"
    "def handler(event, context):\n"
    "    started = time.time()\n"
    "    time.sleep(event.get('hold', 0))\n"
    "    return {'ok': True, 'started': started}\n"
)
PYTHON = "/usr/bin/python3.11"


def scale_out(endpoint: str, instances: int, hold_s: float) -> dict[str, Any]:
    import httpx

    starts: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def one(client: httpx.Client) -> None:
        gate.wait()
        response = client.post("/2015-03-31/functions/scale/invocations", json={"hold": hold_s})
        with lock:
            if response.status_code == 200 and "started" in response.json():
                starts.append(response.json()["started"])
            else:
                failures.append(f"{response.status_code} {response.text[:200]}")

    clients = [httpx.Client(base_url=endpoint, timeout=120) for _ in range(instances)]
    for client in clients:  # connected before the clock starts: the figure is the platform's
        client.get("/v1/health").raise_for_status()
    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    t0 = time.time()
    gate.set()
    for thread in threads:
        thread.join(180)
    for client in clients:
        client.close()
    if failures:
        raise RuntimeError(f"{len(failures)} invocations failed: {failures[:3]}")
    starts.sort()
    return {
        "to_first_s": starts[0] - t0,
        "to_half_s": starts[len(starts) // 2] - t0,
        "to_all_s": starts[-1] - t0,
        "concurrent": sum(1 for s in starts if s < starts[0] + hold_s),
    }


def baseline_scale_out(instances: int) -> dict[str, Any]:
    code = "import json, sys, time; sys.stdout.write(repr(time.time())); sys.stdout.flush()"
    t0 = time.time()
    procs = [
        subprocess.Popen([PYTHON, "-S", "-I", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(instances)
    ]
    starts = sorted(float(p.communicate(timeout=60)[0]) for p in procs)
    return {"to_first_s": starts[0] - t0, "to_half_s": starts[len(starts) // 2] - t0, "to_all_s": starts[-1] - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--hold", type=float, default=5.0, help="seconds each scale-out handler holds its instance")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--memory", type=int, default=128)
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="hxb-bench-scaling-") as tmp:
        work = Path(tmp)
        base_port, hxb_port = free_port(), free_port()
        baseline = start_baseline(work, base_port)
        hxb = start_hxb(work, hxb_port, {})
        endpoint = f"http://127.0.0.1:{hxb_port}"
        import httpx

        try:
            with httpx.Client(base_url=endpoint, timeout=60) as client:
                results["sandbox"] = client.get("/v1/health").json()["sandbox"]
                client.put(
                    "/v1/functions/scale",
                    content=_zip(
                        {
                            "hexabase.yaml": f"function:\n  name: scale\n  memory: {args.memory}\n  timeout: 60\n",
                            "index.py": HOLD_HANDLER,
                        }
                    ),
                    headers={"content-type": "application/zip"},
                ).raise_for_status()
            log(f"scale-out to {args.instances} instances ...")
            results["scale_out"] = {
                "hxb": scale_out(endpoint, args.instances, args.hold),
                "baseline": baseline_scale_out(args.instances),
            }
            with httpx.Client(base_url=endpoint, timeout=60) as client:
                view = client.get("/v1/functions/scale").json()
            results["instances_after"] = view["instances"]
            log(f"throughput at {args.instances} clients ...")
            path = "/2015-03-31/functions/scale/invocations"
            results["throughput_rps"] = {
                "baseline": throughput(base_port, "POST", "/", b"{}", args.instances, args.duration),
                "hxb": throughput(hxb_port, "POST", path, b"{}", args.instances, args.duration),
            }
            with httpx.Client(base_url=endpoint, timeout=60) as client:
                results["throttles"] = client.get("/v1/workspaces/default").json()["throttles"]
        finally:
            stop(hxb)
            stop(baseline)
    results["load_end"] = os.getloadavg()[0]
    report(results, args)


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    hxb, base = r["scale_out"]["hxb"], r["scale_out"]["baseline"]
    rps = r["throughput_rps"]
    print(f"machine: {r['machine']}, load {r['load_start']:.2f} -> {r['load_end']:.2f}, sandbox: {r['sandbox']}")
    print(f"{'':34}{'hxb':>12}{'baseline':>12}{'ratio':>8}")
    for key, label in (("to_first_s", "first"), ("to_half_s", "half"), ("to_all_s", "all")):
        print(
            f"scale-out 0->{args.instances}, {label:<6} running (s){hxb[key]:>11.3f}{base[key]:>12.3f}"
            f"{hxb[key] / base[key]:>7.2f}x"
        )
    print(f"  ({hxb['concurrent']} of {args.instances} handlers ran at the same time; after: {r['instances_after']})")
    if rps["hxb"] is not None and rps["baseline"] is not None:
        label = f"throughput, {args.instances} clients (req/s)"
        print(f"{label:<34}{rps['hxb']:>12.0f}{rps['baseline']:>12.0f}{rps['hxb'] / rps['baseline']:>7.2f}x")
    print(f"throttled invocations: {r['throttles']}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
