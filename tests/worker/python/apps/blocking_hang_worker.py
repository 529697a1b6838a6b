"""A BlockingWorker whose consumer loop serves each connection itself (one
request, then close): GET /hang makes the loop hang while the SDK's
background thread keeps heartbeating. Any other path answers 200 with
X-Worker-Pid."""

import os
import time

import fdbroker_worker


def hang_forever() -> None:
    time.sleep(1000)


def serve(sock) -> None:
    with sock:
        request = sock.initial_data
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(4096)
            if not chunk:
                return
            request += chunk
        if request.startswith(b"GET /hang "):
            hang_forever()
        pid = str(os.getpid()).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                     b"X-Worker-Pid: " + pid + b"\r\nContent-Length: " +
                     str(len(pid)).encode() + b"\r\n\r\n" + pid)


def main() -> None:
    with fdbroker_worker.BlockingWorker.connect() as worker:
        for sock in worker:
            serve(sock)


if __name__ == "__main__":
    main()
