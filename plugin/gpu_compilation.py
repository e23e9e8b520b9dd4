"""Compilation settings for GPU deployments: keep the tap outside captured CUDA graphs.

A captured CUDA graph replays kernels only; the Python body of `circuitwatch::tap` would never run again. With
the op in `splitting_ops` and PIECEWISE graphs, vLLM splits its graph at every tap and runs the op eagerly
between graph pieces. `splitting_ops` replaces vLLM's defaults, so the list starts from vLLM's own attention
ops (read from the installed vLLM, not copied here).

    python -m circuitwatch.plugin.gpu_compilation   # prints the JSON for --compilation-config
"""

from __future__ import annotations

import json

TAP_OP = "circuitwatch::tap"


def gpu_compilation_config() -> dict:
    from vllm.config.compilation import CompilationConfig, CompilationMode

    splitting = [*CompilationConfig._attention_ops, TAP_OP]
    return {"mode": int(CompilationMode.VLLM_COMPILE), "cudagraph_mode": "PIECEWISE", "splitting_ops": splitting}


if __name__ == "__main__":
    print(json.dumps(gpu_compilation_config()))
