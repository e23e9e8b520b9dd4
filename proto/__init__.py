"""The wire contract `circuitwatch.v1` (proto/circuitwatch.proto) and helpers to pack code arrays.

The generated modules `circuitwatch_pb2` / `circuitwatch_pb2_grpc` are build output of proto/generate.py
(`make proto`); import them from here or from `circuitwatch.proto.codec`.
"""

# Minor revision of the v1 contract; see the header of circuitwatch.proto.
CONTRACT_VERSION = 6
# The first revision whose sidecar reads CodeBatch.finishes: a producer carries finishes in batches only then.
FINISHES_IN_BATCHES_SINCE = 6
# Initial metadata of the Ingest call: the sidecar's CONTRACT_VERSION, before it reads any message.
CONTRACT_VERSION_METADATA = "circuitwatch-contract-version"
