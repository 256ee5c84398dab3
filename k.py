import httpx, io, zipfile, asyncio, os, subprocess
U = "http://127.0.0.1:18779"
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("hexabase.yaml", "function:\n  name: sleepy\n  runtime: python3.11\n  handler: index.handler\n")
    z.writestr("index.py", "import time, os\ndef handler(e, c):\n    time.sleep(3)\n    return os.getpid()\n")
print(httpx.put(f"{U}/v1/functions/sleepy", content=buf.getvalue(), timeout=60).status_code)
async def main():
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as c:
        rs = await asyncio.gather(*(c.post(f"{U}/2015-03-31/functions/sleepy/invocations", content=b"{}") for _ in range(20)), return_exceptions=True)
    from collections import Counter
    print(Counter((r.status_code, r.text[:90]) if not isinstance(r, Exception) else repr(r)[:90] for r in rs))
asyncio.run(main())
spid = int(open("/tmp/rev/serve3.pid").read().split()[0])
kids = subprocess.run(["ps", "--ppid", str(spid), "-o", "pid=,stat="], capture_output=True, text=True).stdout.split("\n")
print("children of platform:", [k for k in kids if k.strip()])
print(httpx.get(f"{U}/v1/health").json())
