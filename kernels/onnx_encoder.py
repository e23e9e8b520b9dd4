"""The ONNX Runtime encoder backend: the encoder (normalisation, b_dec, MatMul/Add, the architecture's
activation rule, selection) as one ONNX graph with fixed output shapes, so JumpReLU thresholds need no
data-dependent shapes, and the input norm of each row. What follows the run is elementwise on [rows, width]:
non-positive activations and rows no SAE can read become empty slots (id -1), in numpy on CPU, where a
decode step's handful of graph nodes or torch ops cost more than the matrix product (10-20 us each); the
graph therefore holds only what needs the weights. The reconstruction error (kernels/fidelity.py) is computed
after the session too: ONNX has no gather-and-sum operator, and its Gather materialises [rows, width, d_in],
which cost 14-30% of the encoder's time on large CPU batches (bench/encoder_bench.py, `+fidelity`).

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

from .codes import EMPTY_ID, Codes, readable_rows
from .fidelity import normalize, reconstruction_errors_host
from .reference import LAYER_NORM_EPS, default_selection, with_fidelity
from .selection import CodeSelection
from .spec import Architecture, Normalization, Sae

log = logging.getLogger(__name__)

OPSET = 18  # Reduce* take axes as an input from 18 on
IR_VERSION = 9  # what ONNX Runtime releases of the last years all read (onnx may write newer by default)
# part of the cache key: 2 added fidelity (norms, errors) and emptied unreadable rows; 3 left errors to torch;
# 4 left the masking (unreadable rows, non-positive activations) to after the run
GRAPH_VERSION = 4


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

    # the input norm says which rows an SAE can read (NaN, infinite, all zero): their codes are emptied after
    # the run, with the masking of non-positive activations, so nothing here depends on the row's values
    node("ReduceL2", ["x", const("axes_last", np.array([-1], np.int64))], "norms", keepdims=0)
    x = "x"
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
        # relu is the positive mask applied after the run: the largest pre-activations that are positive are
        # the largest activations. TopK: selecting the width largest of the k_arch largest pre-activations
        # equals selecting the min(width, k_arch) largest.
        acts = pre
        if spec.architecture is Architecture.JUMPRELU:
            above = node("Greater", [pre, const("threshold", w.threshold.numpy())], "above")
            acts = node("Where", [above, pre, const("below", np.float32(0))], "acts")
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
            ["values", "ids"],
            axis=1,
            largest=1,
            sorted=1,
        )
    )
    outputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", width]),
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
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            # seen on a GPU machine with the CPU build: the session falls back to the CPU provider and the first
            # encode fails inside IO binding with "no data transfer registered"
            raise ImportError(
                f"encoder {sae.name}: the onnx backend on {self.device} needs onnxruntime-gpu; the installed "
                f"onnxruntime offers only {', '.join(ort.get_available_providers())}"
            )
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
        self.width = next(o.shape[1] for o in self.session.get_outputs() if o.name == "ids")
        self.path = path
        self.decoder = sae.decoder.to(self.device) if sae.decoder is not None else None
        self.b_dec = sae.weights.b_dec.to(device=self.device, dtype=torch.float32)
        on_host = self.device.type == "cpu"
        self.host_decoder = self.decoder.numpy() if on_host and self.decoder is not None else None
        self.host_b_dec = self.b_dec.numpy() if on_host else None

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
            return self._finish_on_device(x, self._run_cuda(x))
        x = x.cpu().contiguous().numpy()  # a slot reading one head gets a column view
        ids, values, norms = self.session.run(["ids", "values", "norms"], {"x": x})
        return self._finish_on_host(x, ids, values, norms)

    def _finish_on_host(self, x: np.ndarray, ids: np.ndarray, values: np.ndarray, norms: np.ndarray) -> Codes:
        """Masking, padding and fidelity in numpy, in as few calls as possible: on a decode step (one row, the
        caches cold from the model's step) each torch op cost 10-20 us and the two dozen of them more than the
        session's run; numpy's calls cost a few (bench/serving_bench.py; README, serving overhead)."""
        valid = readable_rows(norms)
        with np.errstate(invalid="ignore"):  # NaN activations of unreadable rows compare false: emptied
            active = values > 0
        all_valid = bool(valid.all())
        if not all_valid:
            active &= valid[:, None]
        width = self.selection.width
        code_ids = np.full((ids.shape[0], width), EMPTY_ID, dtype=np.int32)
        code_values = np.zeros((ids.shape[0], width), dtype=np.float32)
        np.copyto(code_ids[:, : ids.shape[1]], ids, where=active, casting="unsafe")
        np.copyto(code_values[:, : values.shape[1]], values, where=active)
        errors = None
        if self.host_decoder is not None:
            sae_in = x if self.sae.spec.normalization is Normalization.NONE else self._normalize_on_host(x)
            errors = reconstruction_errors_host(sae_in, code_ids, code_values, self.host_decoder, self.host_b_dec)
            if not all_valid:
                errors[~valid] = 0.0
        return Codes(
            torch.from_numpy(code_ids),
            torch.from_numpy(code_values),
            torch.from_numpy(errors) if errors is not None else None,
            torch.from_numpy(norms),
        )

    def _normalize_on_host(self, x: np.ndarray) -> np.ndarray:
        return normalize(torch.from_numpy(x), self.sae.spec).numpy()

    def _finish_on_device(self, x: torch.Tensor, out: dict[str, torch.Tensor]) -> Codes:
        """`_finish_on_host` in torch, on the outputs' device (CUDA: IO binding leaves them there)."""
        positive = out["values"] > 0
        codes = _pad(
            torch.where(positive, out["ids"].to(torch.int32), EMPTY_ID),
            torch.where(positive, out["values"], 0.0),
            self.selection.width,
        )
        norms = out["norms"]
        valid = torch.isfinite(norms) & (norms > 0)
        safe = torch.where(valid[:, None], x, 1.0)
        return with_fidelity(self.sae, safe, codes, norms, valid, self.decoder, self.b_dec)

    def _run_cuda(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """IO binding: the input stays on the GPU, outputs land in torch CUDA tensors."""
        rows = x.shape[0]
        out = {
            "ids": torch.empty((rows, self.width), dtype=torch.int64, device=x.device),
            "values": torch.empty((rows, self.width), dtype=torch.float32, device=x.device),
            "norms": torch.empty(rows, dtype=torch.float32, device=x.device),
        }
        binding = self.session.io_binding()
        index = x.device.index or 0
        binding.bind_input("x", "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        for name, tensor in out.items():
            dtype = np.int64 if tensor.dtype == torch.int64 else np.float32
            binding.bind_output(name, "cuda", index, dtype, tuple(tensor.shape), tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _pad(ids: torch.Tensor, values: torch.Tensor, width: int) -> Codes:
    if ids.shape[1] < width:
        pad = width - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, pad), value=EMPTY_ID)
        values = torch.nn.functional.pad(values, (0, pad), value=0.0)
    return Codes(ids, values)
