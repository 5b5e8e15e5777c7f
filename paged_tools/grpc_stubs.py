"""Generate Python gRPC stubs from the .proto files inside the installed TorchServe wheel.

TorchServe ships ``inference.proto`` / ``management.proto`` inside ``ts/frontend/model-server.jar``;
we extract them and run ``grpc_tools.protoc`` (packages grpcio-tools, googleapis-common-protos).

    python -m paged_tools.grpc_stubs OUT_DIR      # writes inference_pb2*.py, management_pb2*.py

    from paged_tools.grpc_stubs import load_stubs
    inference_pb2, inference_pb2_grpc = load_stubs(OUT_DIR)
"""
from __future__ import annotations

import importlib
import os
import sys
import zipfile
from pathlib import Path

PROTOS = ("inference.proto", "management.proto", "google/rpc/status.proto")


def torchserve_jar() -> Path:
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    if not jar.exists():
        raise FileNotFoundError(f"TorchServe frontend jar not found at {jar}")
    return jar


def generate(out_dir: str | os.PathLike) -> Path:
    """Extract the protos and compile them into ``out_dir`` (idempotent)."""
    from grpc_tools import protoc

    out = Path(out_dir)
    proto_dir = out / "protos"
    proto_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(torchserve_jar()) as jar:
        for name in PROTOS:
            target = proto_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jar.read(name))
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    for name in ("inference.proto", "management.proto"):
        rc = protoc.main(["grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(proto_dir / name)])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {name} (exit {rc})")
    return out


def load_stubs(out_dir: str | os.PathLike, which: str = "inference"):
    """(``<which>_pb2``, ``<which>_pb2_grpc``), generating them first if needed."""
    out = Path(out_dir)
    if not (out / f"{which}_pb2_grpc.py").exists():
        generate(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module(f"{which}_pb2"), importlib.import_module(f"{which}_pb2_grpc")


if __name__ == "__main__":
    print(generate(sys.argv[1] if len(sys.argv) > 1 else "build/grpc_stubs"))
