"""run_process: output, input, exit codes, timeouts, and that the event loop keeps running."""

from __future__ import annotations

import asyncio
import signal
import sys

import pytest

from hxb._subprocess import run_process


async def test_output_and_status_are_collected() -> None:
    result = await run_process(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


async def test_input_is_fed_even_when_larger_than_a_pipe() -> None:
    data = b"x" * (1024 * 1024)
    result = await run_process(["cat"], input_bytes=data)
    assert result.returncode == 0
    assert result.stdout == data


async def test_a_signal_death_is_a_negative_status() -> None:
    result = await run_process(["sh", "-c", "kill -9 $$"])
    assert result.returncode == -signal.SIGKILL


async def test_a_timeout_kills_the_program() -> None:
    with pytest.raises(TimeoutError):
        await run_process(["sleep", "30"], timeout_s=0.2)


async def test_the_loop_keeps_running_while_a_program_runs() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    result = await run_process([sys.executable, "-c", "import time; time.sleep(0.3)"])
    ticker.cancel()
    assert result.returncode == 0
    assert ticks >= 10


async def test_many_at_once_each_see_their_own_exit() -> None:
    # Each run closes its fds exactly once: a double close would hit another run's fd.
    results = await asyncio.gather(*(run_process(["sh", "-c", f"echo {i}; exit {i % 5}"]) for i in range(40)))
    assert [r.returncode for r in results] == [i % 5 for i in range(40)]
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(40)]


async def test_a_cancelled_run_is_killed_and_leaves_nothing_watching_its_fds() -> None:
    running = asyncio.create_task(run_process(["sleep", "30"]))
    await asyncio.sleep(0.2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    # The next runs get the same fd numbers: a stale registration would swallow their exits.
    for _ in range(3):
        result = await asyncio.wait_for(run_process(["true"]), timeout=5)
        assert result.returncode == 0
    survivors = await run_process(["pgrep", "-f", "^sleep 30$"])
    assert survivors.stdout == b""
