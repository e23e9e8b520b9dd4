"""The ONNX Runtime encoder backend: the whole encoder (normalisation, b_dec, MatMul/Add, the architecture's
activation rule, selection) as one ONNX graph with fixed output shapes, so JumpReLU thresholds and inactive
slots need no data-dependent shapes: inactive slots come out as id -1. The same graph measures each row's
input norm and empties the codes of rows no SAE can read. The reconstruction error (kernels/fidelity.py) is
the torch embedding_bag after the session, as for the Triton kernel: ONNX has no gather-and-sum operator, and
its Gather materialises [rows, width, d_in], which cost 14-30% of the encoder's time on CPU where the
embedding_bag costs about 1% (bench/encoder_bench.py, `+fidelity`).

The graph is built with onnx.helper (no tracing) and cached next to the SAE (or in the user cache when the SAE
directory is read-only), keyed by the SAE's weights hash and the selection. CPU execution provider here; CUDA
with IO binding where onnxruntime-gpu is installed. ONNX TopK (sorted, largest) puts the lower index first
among equal values, the reference's tie rule.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .codes import EMPTY_ID, Codes
from .reference import LAYER_NORM_EPS, default_selection, with_fidelity
from .selection import CodeSelection
from .spec import Architecture, Normalization, Sae

log = logging.getLogger(__name__)

OPSET = 18  # Reduce* take axes as an input from 18 on
IR_VERSION = 9  # what ONNX Runtime releases of the last years all read (onnx may write newer by default)
# part of the cache key: 2 added fidelity (norms, errors) and emptied unreadable rows; 3 left errors to torch
GRAPH_VERSION = 3


def _graph(sae: Sae, selection: CodeSelection):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec, w = sae.spec, sae.weights
    nodes, inits = [], []

    def const(name: str, array) -> str:
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    # rows no SAE can read (NaN, infinite, all zero) are encoded from a finite stand-in and emptied at the end
    axes_last = const("axes_last", np.array([-1], np.int64))
    n2 = node("ReduceSumSquare", ["x", axes_last], "n2", keepdims=0)
    node("Sqrt", [n2], "norms")
    finite = node("Not", [node("Or", [node("IsNaN", [n2], "n2_nan"), node("IsInf", [n2], "n2_inf")], "n2_bad")], "ok")
    valid = node("And", [finite, node("Greater", [n2, const("zero_n2", np.float32(0))], "nonzero")], "valid")
    valid_col = node("Unsqueeze", [valid, axes_last], "valid_col")
    x = node("Where", [valid_col, "x", const("stand_in", np.float32(1))], "x_safe")
    if spec.normalization is Normalization.CONSTANT_NORM_RESCALE:
        norm = node("ReduceL2", [x, const("axes", np.array([-1], np.int64))], "norm", keepdims=1)
        x = node("Mul", [node("Div", [x, norm], "unit"), const("sqrt_d_in", np.float32(spec.d_in**0.5))], "rescaled")
    elif spec.normalization is Normalization.LAYER_NORM:
        axes = const("axes", np.array([-1], np.int64))
        centred = node("Sub", [x, node("ReduceMean", [x, axes], "mean", keepdims=1)], "centred")
        var = node("ReduceSumSquare", [centred, axes], "sum_sq", keepdims=1)
        unbiased = node("Div", [var, const("n_minus_1", np.float32(spec.d_in - 1))], "var")
        std = node("Add", [node("Sqrt", [unbiased], "std"), const("eps", np.float32(LAYER_NORM_EPS))], "std_eps")
        x = node("Div", [centred, std], "normed")
    if spec.apply_b_dec_to_input:
        x = node("Sub", [x, const("b_dec", w.b_dec.numpy())], "sae_in")
    W_enc = const("W_enc", w.W_enc.numpy())
    if spec.architecture is Architecture.GATED:
        gate = node(
            "Greater",
            [
                node("Add", [node("MatMul", [x, W_enc], "xw"), const("b_gate", w.b_gate.numpy())], "gate_pre"),
                const("zero", np.float32(0)),
            ],
            "gate",
        )
        W_mag = const("W_mag", (w.W_enc * torch.exp(w.r_mag)).numpy())
        magnitude = node(
            "Relu", [node("Add", [node("MatMul", [x, W_mag], "xm"), const("b_mag", w.b_mag.numpy())], "mag_pre")], "mag"
        )
        acts = node("Mul", [magnitude, node("Cast", [gate], "gate_f", to=TensorProto.FLOAT)], "acts")
    else:
        pre = node("Add", [node("MatMul", [x, W_enc], "xw"), const("b_enc", w.b_enc.numpy())], "pre")
        if spec.architecture is Architecture.JUMPRELU:
            fires = node(
                "Cast",
                [node("Greater", [pre, const("threshold", w.threshold.numpy())], "above")],
                "above_f",
                to=TensorProto.FLOAT,
            )
            acts = node("Mul", [node("Relu", [pre], "relu"), fires], "acts")
        elif spec.architecture is Architecture.TOPK:
            # the k_arch largest pre-activations, relu: selecting the width largest of those equals selecting
            # the min(width, k_arch) largest pre-activations and keeping the positive ones
            acts = pre
        else:
            acts = node("Relu", [pre], "acts")
    width = (
        selection.width
        if spec.architecture is not Architecture.TOPK
        else min(selection.width, spec.k or selection.width)
    )
    width = min(width, spec.d_sae)
    nodes.append(
        helper.make_node(
            "TopK",
            [acts, const("k", np.array([width], np.int64))],
            ["top_values", "top_ids"],
            axis=1,
            largest=1,
            sorted=1,
        )
    )
    positive = node("Greater", ["top_values", const("zero_out", np.float32(0))], "positive")
    active = node("And", [positive, valid_col], "active")
    node(
        "Where",
        [active, node("Cast", ["top_ids"], "ids32", to=TensorProto.INT32), const("empty", np.int32(EMPTY_ID))],
        "ids",
    )
    node("Where", [active, "top_values", const("zero_value", np.float32(0))], "values")
    outputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["rows", width]),
        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", width]),
        helper.make_tensor_value_info("norms", TensorProto.FLOAT, ["rows"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"circuitwatch_encoder_{spec.architecture.value}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", spec.d_in])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="circuitwatch")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def cache_path(sae: Sae, selection: CodeSelection) -> Path:
    identity = f"{sae.weights_hash}|{sae.decoder_hash}|{selection.describe()}|{OPSET}|{GRAPH_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    beside = sae.spec.path / ".circuitwatch"
    if os.access(sae.spec.path, os.W_OK):
        return beside / f"encoder-{key}.onnx"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "circuitwatch" / f"encoder-{key}.onnx"


class OnnxEncoder:
    """Same interface as ReferenceEncoder.encode: rows [n, d_in] -> fixed-width Codes."""

    name = "onnx"

    def __init__(self, sae: Sae, selection: CodeSelection | None = None, device: torch.device | str = "cpu") -> None:
        import onnxruntime as ort

        self.sae = sae
        self.selection = selection or default_selection(sae)
        self.device = torch.device(device)
        path = cache_path(sae, self.selection)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(_graph(sae, self.selection).SerializeToString())
            temporary.replace(path)  # atomic: concurrent workers never read a half-written file
            log.info("exported the %s encoder to %s", sae.name, path)
        providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else []
        providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # ONNX Runtime's workers otherwise busy-wait after each run, taking the cores from the torch work that
        # follows (the fidelity gather here, the model step in the plugin): on 2 shared cores that made the
        # 16-row gather 3x slower than the encoder itself
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(path), options, providers=[p for p in providers if p in ort.get_available_providers()]
        )
        self.width = self.session.get_outputs()[0].shape[1]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.path = path
        self.decoder = sae.decoder.to(self.device) if sae.decoder is not None else None
        self.b_dec = sae.weights.b_dec.to(device=self.device, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> Codes:
        if x.ndim != 2 or x.shape[1] != self.sae.spec.d_in:
            raise ValueError(
                f"encoder {self.sae.name}: expected input [rows, {self.sae.spec.d_in}], got {list(x.shape)}"
            )
        width = self.selection.width
        if x.shape[0] == 0:
            errors = torch.zeros(0) if self.sae.decoder is not None else None
            return Codes(
                torch.full((0, width), EMPTY_ID, dtype=torch.int32), torch.zeros(0, width), errors, torch.zeros(0)
            )
        x = x.detach().to(torch.float32)
        if self.device.type == "cuda":
            x = x.to(self.device).contiguous()
            out = self._run_cuda(x)
        else:
            x = x.cpu()
            results = self.session.run(None, {"x": x.numpy()})
            out = {name: torch.from_numpy(array) for name, array in zip(self.outputs, results, strict=True)}
        codes = _pad(out["ids"], out["values"], width)
        norms = out["norms"]
        valid = torch.isfinite(norms) & (norms > 0)
        if self.decoder is None:
            return Codes(codes.ids, codes.values, None, norms)
        safe = torch.where(valid[:, None], x, 1.0)  # the graph already emptied unreadable rows' codes
        return with_fidelity(self.sae, safe, codes, norms, valid, self.decoder, self.b_dec)

    def _run_cuda(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """IO binding: the input stays on the GPU, outputs land in torch CUDA tensors."""
        rows = x.shape[0]
        out = {
            "ids": torch.empty((rows, self.width), dtype=torch.int32, device=x.device),
            "values": torch.empty((rows, self.width), dtype=torch.float32, device=x.device),
            "norms": torch.empty(rows, dtype=torch.float32, device=x.device),
        }
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input("x", "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for name, tensor in out.items():
            dtype = np.int32 if tensor.dtype == torch.int32 else np.float32
            binding.bind_output(name, "cuda", index, dtype, tuple(tensor.shape), tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _pad(ids: torch.Tensor, values: torch.Tensor, width: int) -> Codes:
    if ids.shape[1] < width:
        pad = width - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=EMPTY_ID)
        values = torch.nn.functional.pad(values, (0, pad), value=0.0)
    return Codes(ids, values)
