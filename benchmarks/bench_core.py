"""Core-path benchmark: cold start, warm latency and throughput of hxb, each beside a baseline
measured in the same run.

  cold start   first invoke after deploy (request -> response, isolation as configured)
               vs. a fresh interpreter spawned per call that imports and runs the same handler
  warm latency p50/p99 over one keep-alive connection, Invoke API and HTTP trigger
               vs. a minimal uvicorn app (uvloop + httptools) returning the same JSON
  throughput   requests/s with 16 concurrent keep-alive clients (wrk), same pair

Usage: .venv/bin/python benchmarks/bench_core.py [--requests 2000] [--cold 20] [--duration 5]
Prints a table and one JSON line. Loopback only; everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
HANDLER = "def handler(event, context):\n    return {'ok': True}\n"
# One vCPU: the CPU quota that scales with memory (7% of a CPU at 128 MB, as in Lambda) does
# not bind, so warm figures measure the platform, not the quota.
WARM_MEMORY_MB = 1769
# 16 warm instances of 1769 MB (28 GB of memory sizes) are over the default node budget of this
# 24 GB VM (80%: 19.6 GB), which would throttle the throughput run. The budget counts sizes,
# not use (an idle instance uses ~5 MB): raised here so the figures measure the warm path.
BENCH_MEMORY_BUDGET_MB = 64 * 1024
HTTP_HANDLER = (
    "def handler(event, context):\n"
    "    return {'statusCode': 200, 'headers': {'content-type': 'application/json'}, 'body': '{\"ok\": true}'}\n"
)
BASELINE_APP = textwrap.dedent(
    """
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        body = b'{"ok":true}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"11")]})
        await send({"type": "http.response.body", "body": body})
    """
)


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str = "/", timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise RuntimeError(f"nothing answered on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# --- measurements -------------------------------------------------------------------------------


def sequential_latency(port: int, method: str, path: str, body: bytes, requests: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"content-type": "application/json"}
    samples: list[float] = []
    for i in range(requests + 100):
        started = time.perf_counter()
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"{method} {path} -> {response.status}: {data[:200]!r}")
        if i >= 100:  # the first 100 warm up both sides
            samples.append(elapsed)
    conn.close()
    samples.sort()
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99), "mean_ms": statistics.mean(samples)}


def throughput(port: int, method: str, path: str, body: bytes, connections: int, duration_s: int) -> float | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        log("wrk not found (apt-get install wrk): throughput skipped")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            f'wrk.method = "{method}"\nwrk.body = {json.dumps(body.decode())}\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        out = subprocess.run(
            [
                wrk,
                "-t",
                "2",
                "-c",
                str(connections),
                "-d",
                f"{duration_s}s",
                "-s",
                script.name,
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=duration_s + 30,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error responses on {path}:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else None


def baseline_cold(work: Path, runs: int) -> list[float]:
    """A fresh interpreter per call that imports the handler and prints its JSON result."""
    (work / "fn").mkdir(exist_ok=True)
    (work / "fn" / "index.py").write_text(HANDLER)
    python = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else sys.executable
    code = "import sys,json;sys.path.insert(0,sys.argv[1]);import index;print(json.dumps(index.handler({},None)))"
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run([python, "-I", "-S", "-c", code, str(work / "fn")], capture_output=True, check=True)
        samples.append((time.perf_counter() - started) * 1000)
        assert b"true" in out.stdout
    return sorted(samples)


def hxb_cold(endpoint: str, work: Path, runs: int) -> list[float]:
    import httpx

    sys.path.insert(0, str(HERE.parent / "tests"))
    samples = []
    with httpx.Client(base_url=endpoint, timeout=60) as client:
        for i in range(runs):
            name = f"cold-{i}"
            package = _zip({"hexabase.yaml": f"function:\n  name: {name}\n", "index.py": HANDLER})
            r = client.put(f"/v1/functions/{name}", content=package, headers={"content-type": "application/zip"})
            r.raise_for_status()
            started = time.perf_counter()
            r = client.post(f"/2015-03-31/functions/{name}/invocations", content=b"{}")
            samples.append((time.perf_counter() - started) * 1000)
            if r.status_code != 200 or "x-amz-function-error" in r.headers:
                raise RuntimeError(f"cold invoke failed: {r.status_code} {r.text}")
            client.delete(f"/v1/functions/{name}")
    return sorted(samples)


def _zip(files: dict[str, str]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


# --- servers ------------------------------------------------------------------------------------


def start_hxb(work: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HXB_")}
    env.update(env_extra)
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "hxb"),
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(work / "hxb-data"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    wait_http(port, "/v1/health")
    return proc


def start_baseline(work: Path, port: int) -> subprocess.Popen[bytes]:
    (work / "baseline_app.py").write_text(BASELINE_APP)
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "uvicorn"),
            "baseline_app:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_http(port)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cold", type=int, default=20)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()

    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="hxb-bench-") as tmp:
        work = Path(tmp)
        base_port, hxb_port = free_port(), free_port()
        baseline = start_baseline(work, base_port)
        hxb = start_hxb(work, hxb_port, {"HXB_POOL_MEMORY_BUDGET_MB": str(BENCH_MEMORY_BUDGET_MB)})
        endpoint = f"http://127.0.0.1:{hxb_port}"
        import httpx

        results["sandbox"] = httpx.get(f"{endpoint}/v1/health").json()["sandbox"]
        try:
            log("cold starts ...")
            cold = hxb_cold(endpoint, work, args.cold)
            cold_base = baseline_cold(work, args.cold)
            results["cold_ms"] = {
                "hxb_p50": percentile(cold, 50),
                "hxb_p99": percentile(cold, 99),
                "baseline_p50": percentile(cold_base, 50),
                "baseline_p99": percentile(cold_base, 99),
            }

            import httpx

            with httpx.Client(base_url=endpoint) as client:
                client.put(
                    "/v1/functions/bench",
                    content=_zip(
                        {
                            "hexabase.yaml": f"function:\n  name: bench\n  memory: {WARM_MEMORY_MB}\n",
                            "index.py": HANDLER,
                        }
                    ),
                    headers={"content-type": "application/zip"},
                ).raise_for_status()
                client.put(
                    "/v1/functions/bench-http",
                    content=_zip(
                        {
                            "hexabase.yaml": f"function:\n  name: bench-http\n  memory: {WARM_MEMORY_MB}\n",
                            "index.py": HTTP_HANDLER,
                        }
                    ),
                    headers={"content-type": "application/zip"},
                ).raise_for_status()

            invoke_path = "/2015-03-31/functions/bench/invocations"
            log("warm latency ...")
            results["warm_ms"] = {
                "baseline": sequential_latency(base_port, "POST", "/", b"{}", args.requests),
                "invoke_api": sequential_latency(hxb_port, "POST", invoke_path, b"{}", args.requests),
                "http_trigger": sequential_latency(hxb_port, "GET", "/fn/bench-http/", b"", args.requests),
            }
            log("throughput ...")
            results["throughput_rps"] = {
                "baseline": throughput(base_port, "POST", "/", b"{}", args.connections, args.duration),
                "invoke_api": throughput(hxb_port, "POST", invoke_path, b"{}", args.connections, args.duration),
                "http_trigger": throughput(hxb_port, "GET", "/fn/bench-http/", b"", args.connections, args.duration),
            }
        finally:
            stop(hxb)
            stop(baseline)
    results["load_end"] = os.getloadavg()[0]
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cold, warm, rps = results["cold_ms"], results["warm_ms"], results["throughput_rps"]
    base = warm["baseline"]
    lines = [
        f"hxb core benchmark — {results['machine']}, sandbox {results['sandbox']}, "
        f"load {results['load_start']:.2f} -> {results['load_end']:.2f}",
        "",
        f"cold start ({args.cold} runs)       hxb p50 {cold['hxb_p50']:7.1f} ms  p99 {cold['hxb_p99']:7.1f} ms   "
        f"baseline (fresh interpreter) p50 {cold['baseline_p50']:6.1f} ms  p99 {cold['baseline_p99']:6.1f} ms   "
        f"ratio p50 {cold['hxb_p50'] / cold['baseline_p50']:.2f}x",
    ]
    for key, label in (("invoke_api", "Invoke API"), ("http_trigger", "HTTP trigger")):
        w = warm[key]
        lines.append(
            f"warm {label:<13} p50 {w['p50_ms']:6.3f} ms  p99 {w['p99_ms']:6.3f} ms   "
            f"baseline (bare uvicorn) p50 {base['p50_ms']:6.3f} ms  p99 {base['p99_ms']:6.3f} ms   "
            f"ratio p50 {w['p50_ms'] / base['p50_ms']:.2f}x  p99 {w['p99_ms'] / base['p99_ms']:.2f}x"
        )
    if rps["baseline"]:
        for key, label in (("invoke_api", "Invoke API"), ("http_trigger", "HTTP trigger")):
            lines.append(
                f"throughput {label:<13} {rps[key]:8.0f} req/s   baseline {rps['baseline']:8.0f} req/s   "
                f"ratio {rps[key] / rps['baseline']:.2f}x  ({args.connections} connections)"
            )
    print("\n".join(lines))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
