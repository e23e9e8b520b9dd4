"""circuitwatch: sparse-autoencoder monitoring for vLLM serving.

Components live in their own subpackages (see DESIGN.md): `circuitwatch.proto` (wire contract),
`circuitwatch.kernels` (SAE artifacts and encoders), `circuitwatch.plugin` (vLLM plugin),
`circuitwatch.sidecar` (gRPC index and circuits) and `circuitwatch.fixtures` (deterministic test fixtures).
"""

__version__ = "0.1.0"
