"""The circuitwatch vLLM plugin (entry point `vllm.general_plugins: circuitwatch`).

vLLM calls `register()` once in every process. Installed but unconfigured (no $CIRCUITWATCH_CONFIG and no
`--additional-config '{"circuitwatch": ...}'`), it does nothing.
"""


def register() -> None:
    from .patches import apply

    apply()
