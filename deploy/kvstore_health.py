#!/usr/bin/env python3
"""gRPC health probe of the kvstore daemon (Docker HEALTHCHECK; Kubernetes uses its own `grpc:` probe).

    kvstore_health.py [HOST:PORT] [SERVICE]     # defaults: 127.0.0.1:50052 and "" (the whole daemon)

Exit 0 when grpc.health.v1.Health/Check answers SERVING, 1 otherwise. The health service needs no
token. The default port is the config's `health_port` (deploy/kvstore.compose.yaml), where a server
of its own answers checks without waiting behind data calls; the gRPC port (`listen`) answers too. SERVICE `tierkv.kvstore.v1.KVStore/tier/<name>` asks about one tier.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str = "127.0.0.1:50052", service: str = "", timeout_s: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    sys.exit(0 if check(*sys.argv[1:3]) else 1)
