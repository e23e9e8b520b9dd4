"""The circuitwatch vLLM plugin (entry point `vllm.general_plugins: circuitwatch`).

vLLM calls `register()` once in every process. Installed but unconfigured (no $CIRCUITWATCH_CONFIG and no
`--additional-config '{"circuitwatch": ...}'`), it does nothing. On a vLLM outside the supported range
(plugin/compat.py) it stops start-up instead: vLLM propagates the error, so the server never serves unmonitored.

Keep this module free of imports: vLLM only logs (and then runs without the plugin) when importing an entry
point fails, whereas it propagates what register() raises.
"""


def register() -> None:
    from .compat import UnsupportedVLLMError, check_vllm_version

    try:
        check_vllm_version()
    except UnsupportedVLLMError as error:
        import logging

        logging.getLogger("circuitwatch.plugin").error("circuitwatch: %s", error)  # the one line, above the trace
        raise
    from .patches import apply

    apply()
