#!/usr/bin/env python3
"""An independent gRPC client (Python grpcio, the C-core implementation) against a running
TreeBuilder: health check, then a BuildTree stream. Stubs are generated from proto/ at run
time with grpcio-tools, so this checks the contract as another language sees it.

Usage: interop.py ADDR DIR EXPECTED_ROOT   (exit 0 when everything matches); the bearer token
is read from the file $MERKLE_TOKEN_FILE.
"""
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc


def generate_stubs(proto_root: str, out: str) -> None:
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    files = [
        "merkle/common/v1/common.proto",
        "merkle/treebuilder/v1/treebuilder.proto",
    ]
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + files) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    addr, directory, expected_root = sys.argv[1:4]
    proto_root = os.path.join(os.path.dirname(__file__), "..", "..", "proto")
    with tempfile.TemporaryDirectory() as out:
        generate_stubs(proto_root, out)
        sys.path.insert(0, out)
        from merkle.treebuilder.v1 import treebuilder_pb2, treebuilder_pb2_grpc

        with open(os.environ["MERKLE_TOKEN_FILE"]) as f:
            token = f.read().strip()
        credentials = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(
                health_pb2.HealthCheckRequest(service="merkle.treebuilder.v1.TreeBuilderService"),
                timeout=10,
            ).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                print(f"health: {status}", file=sys.stderr)
                return 1

            stub = treebuilder_pb2_grpc.TreeBuilderServiceStub(channel)
            request = treebuilder_pb2.BuildTreeRequest(path=directory, include_nodes=True)
            nodes, result = 0, None
            for message in stub.BuildTree(request, timeout=60, metadata=credentials):
                kind = message.WhichOneof("event")
                if kind == "nodes":
                    nodes += len(message.nodes.nodes)
                elif kind == "result":
                    result = message.result
            if result is None or result.root_hash != expected_root:
                print(f"root: got {result and result.root_hash}, want {expected_root}", file=sys.stderr)
                return 1
            if nodes != result.node_count:
                print(f"nodes: got {nodes}, result says {result.node_count}", file=sys.stderr)
                return 1

            try:
                stub.VerifyTree(
                    treebuilder_pb2.VerifyTreeRequest(path=directory, expected_root_hash="xyz"),
                    timeout=10,
                    metadata=credentials,
                )
                print("VerifyTree accepted a bad hash", file=sys.stderr)
                return 1
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.INVALID_ARGUMENT or "expected_root_hash" not in err.details():
                    print(f"VerifyTree: {err.code()} {err.details()}", file=sys.stderr)
                    return 1
    print(f"interop ok: {result.root_hash} ({nodes} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
