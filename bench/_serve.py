"""``python -m bench._serve APP FD``: uvicorn on an inherited listening socket, with TCP_NODELAY.

``uvicorn --fd`` wraps the descriptor as an AF_UNIX socket, so asyncio never sets
TCP_NODELAY on the connections it accepts and a response written in two pieces waits
for the client's delayed ACK (~40 ms). Handing uvicorn a socket object rebuilt from
the descriptor (family and protocol detected) avoids that: the floors measure the
transport, not that quirk.
"""

from __future__ import annotations

import socket
import sys

import uvicorn


def main() -> None:
    app, fd, ws_max = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws_per_message_deflate=False,
                            ws_max_size=ws_max, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
