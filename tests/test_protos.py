"""The committed protos/gen stubs match a fresh generation from protos/*.proto."""

import subprocess
import sys
from pathlib import Path


def test_generated_stubs_are_fresh():
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "protos.generate", "--check"], cwd=root,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_worker_and_kv_transfer_stubs_import():
    from protos.gen import kv_transfer_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: F401
    assert "Decode" in worker_pb2.DESCRIPTOR.services_by_name["Worker"].methods_by_name
