"""A gRPC client that knows nothing of Flotilla but its server's address.

Run by node/tests/cli.rs against a real `flotilla server`. With only grpcio, grpcio-reflection
(which speaks grpc.reflection.v1alpha) and protobuf, and no .proto file, it:

1. lists the services through server reflection;
2. finds flotilla.v1.FleetService/SubmitFleet and its request and response types in the
   descriptors the server sends;
3. builds a SubmitFleetRequest from those descriptors and calls SubmitFleet.

Usage: reflection_client.py HOST:PORT REQUEST_JSON [CA_FILE]
With CA_FILE the channel is TLS with that CA; without it, plaintext.
REQUEST_JSON is a SubmitFleetRequest in protobuf's JSON mapping. Prints one JSON document:
{"services": [...], "request_type": ..., "response": <SubmitFleetResponse as JSON>}.
Exits non-zero (with a traceback) on any failure.
"""

import json
import os
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "flotilla.v1.FleetService"
METHOD = "SubmitFleet"
TIMEOUT_SECONDS = 30


def main() -> int:
    address, request_json = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        with open(sys.argv[3], "rb") as ca_file:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca_file.read())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        if SERVICE not in services:
            raise SystemExit(f"{SERVICE} not among the reflected services {services}")
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName(SERVICE).FindMethodByName(METHOD)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(request_json, request_class())
        submit = channel.unary_unary(
            f"/{SERVICE}/{METHOD}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        # The bearer token (FLOTILLA_TOKEN), as any gRPC client sends it: authorization metadata.
        token = os.environ.get("FLOTILLA_TOKEN", "")
        metadata = [("authorization", f"Bearer {token}")] if token else []
        response = submit(request, timeout=TIMEOUT_SECONDS, metadata=metadata)
        print(
            json.dumps(
                {
                    "services": services,
                    "request_type": method.input_type.full_name,
                    "response": json_format.MessageToDict(response),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
