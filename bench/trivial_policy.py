"""The floor for any asyncio policy service: answers ``action=DUNNO`` to every request
and does nothing else.

``python -m bench.trivial_policy PORT`` serves it on 127.0.0.1 until SIGTERM. Case "2pt"
measures it, so that what callahead's policy front end costs can be told apart from
what the policy protocol costs any policy service (a request and a reply per RCPT on a
connection smtpd keeps).
"""

from __future__ import annotations

import asyncio
import signal
import sys


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line in (b"\n", b"\r\n"):
                writer.write(b"action=DUNNO\n\n")
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve_one, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m bench.trivial_policy PORT", file=sys.stderr)
        sys.exit(64)
    asyncio.run(main(int(sys.argv[1])))
