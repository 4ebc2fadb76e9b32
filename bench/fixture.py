"""The benchmark's example service: a few thousand vendored dependency files and a
small app, generated deterministically so every run measures the same input."""

from __future__ import annotations

import random
from pathlib import Path

APP = """\
import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok " + os.environ.get("VERSION", "dev").encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Handler).serve_forever()
"""

SPEC = """\
version: 1
images:
  svc:
    steps:
      - copy: vendor
        to: /app/vendor
      - copy: app
        to: /app
      - workdir: /app
      - entrypoint: python3 app.py
"""

CONTAINERFILE = """\
FROM scratch
COPY vendor /app/vendor
COPY app /app
WORKDIR /app
ENTRYPOINT ["python3", "app.py"]
"""


def make_project(root: Path, *, packages: int = 60, modules: int = 50, seed: int = 7) -> Path:
    """Write the project: ``packages * modules`` vendored files (~8 KiB each) + the app."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for p in range(packages):
        pkg = root / "vendor" / f"pkg{p:03d}"
        pkg.mkdir(parents=True, exist_ok=True)
        for m in range(modules):
            words = " ".join(rng.choice(WORDS) for _ in range(1200))
            (pkg / f"mod{m:03d}.py").write_text(f'"""{words}"""\nVALUE = {rng.random()!r}\n')
    (root / "app").mkdir(exist_ok=True)
    (root / "app" / "app.py").write_text(APP)
    (root / "graven.yaml").write_text(SPEC)
    (root / "Containerfile").write_text(CONTAINERFILE)
    return root


def touch_app(root: Path, version: int) -> None:
    (root / "app" / "app.py").write_text(APP + f"# version {version}\n")


def touch_vendored(root: Path, version: int) -> Path:
    path = root / "vendor" / "pkg017" / "mod023.py"
    path.write_text(path.read_text().split("\n# edit")[0] + f"\n# edit {version}\n")
    return path


WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega import return class def yield async await lambda"
).split()
