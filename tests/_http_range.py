"""A loopback HTTP server for one folder that answers range requests (tests: GDAL's /vsicurl/).

Run as ``python tests/_http_range.py FOLDER``: prints its port, serves until terminated (at most an hour).
"""

from __future__ import annotations

import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def main() -> None:
    folder = Path(sys.argv[1])

    class RangeHandler(SimpleHTTPRequestHandler):
        timeout = 10  # a client that stops reading frees its thread

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

        def send_head(self) -> Any:
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                self.send_error(404)
                return None
            size = path.stat().st_size
            m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            a, b = (int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)) if m else (0, size - 1)
            self.send_response(206 if m else 200)
            if m:
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
            self.send_header("Content-Length", str(b - a + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            f = path.open("rb")
            f.seek(a)
            self._left = b - a + 1
            return f

        def copyfile(self, source: Any, outputfile: Any) -> None:
            outputfile.write(source.read(self._left))

    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    print(server.server_address[1], flush=True)
    threading.Timer(3600, server.shutdown).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
