"""A TCP proxy that delays every chunk the server sends: a real Redis behind a slow network."""

from __future__ import annotations

import socket
import threading
import time


class SlowProxy:
    """Listens on a free loopback port and forwards to `target`, sleeping `delay_s` before each
    chunk of at most `chunk` bytes sent back to the client."""

    def __init__(self, target: tuple[str, int], delay_s: float, chunk: int = 16384) -> None:
        self.target, self.delay_s, self.chunk = target, delay_s, chunk
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.delay_s), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        try:
            while data := src.recv(self.chunk):
                if delay_s:
                    time.sleep(delay_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
