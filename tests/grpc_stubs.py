"""gRPC client stubs for TorchServe, generated at test time from the .proto files inside the installed frontend.

The protos ship in TorchServe's `model-server.jar` (`proto/inference.proto` and the files it
imports); generating from them, rather than from a copy kept here, tests against exactly the
service the pinned TorchServe serves. `google/rpc/status.proto` comes from googleapis-common-protos
and the well-known types from grpcio-tools.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import google.rpc
import grpc_tools
import ts
from grpc_tools import protoc

JAR = Path(ts.__file__).parent / "frontend" / "model-server.jar"
PROTOS = ("inference.proto",)


def generate(into: Path) -> tuple[ModuleType, ModuleType]:
    """Extract TorchServe's protos into `into`, compile them, and return (inference_pb2, inference_pb2_grpc)."""
    into.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(JAR) as jar:
        for name in PROTOS:
            (into / name).write_bytes(jar.read(f"proto/{name}"))
    includes = [
        f"-I{into}",
        f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
        f"-I{Path(next(iter(google.rpc.__path__))).parent.parent}",
    ]
    args = ["protoc", *includes, f"--python_out={into}", f"--grpc_python_out={into}", *(str(into / name) for name in PROTOS)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTOS} from {JAR}")
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(into))
