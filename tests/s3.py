"""A real S3 API server for tests: ``moto_server`` on 127.0.0.1, reached as a cluster reaches
MinIO, through ``AWS_ENDPOINT_URL`` (``pyarrow.fs.FileSystem.from_uri`` honours it; RAY_NOTES.md).

    from s3 import s3_server  # noqa: F401   (in a test module; or import it in conftest.py)

    def test_x(s3_server):
        uri = s3_server.bucket("runs")        # "s3://runs", created with a PUT
        pyarrow.fs.copy_files(str(local_dir), f"{uri}/run")

The fixture is session-scoped: one server, dummy credentials, the environment restored after.
Each ``bucket(name)`` call makes a fresh bucket (a name is suffixed to stay unique).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class S3Server:
    endpoint: str

    def bucket(self, name: str) -> str:
        """Create a fresh bucket (S3's PUT Bucket) and return its ``s3://`` URI."""
        name = f"{name}-{uuid.uuid4().hex[:8]}"
        req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200, resp.status
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.is_file():
        pytest.fail(f"{exe} not found: install the dev extra (moto[server])")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # bounded: moto's first answer imports its backends
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited with {proc.returncode}")
            try:
                urllib.request.urlopen(endpoint, timeout=10).close()
                break
            except OSError:  # refused while starting, or a read timed out
                if time.monotonic() > deadline:
                    pytest.fail("moto_server did not answer within 60 s")
                time.sleep(0.1)
        saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            yield S3Server(endpoint)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.terminate()
        proc.wait(timeout=10)
