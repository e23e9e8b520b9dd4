"""On a CUDA machine, with torch alone: the plugin's device-to-host path (plugin/device_copy.py) leaves the step
free and delivers exactly the encoder's codes.

    python scripts/gpu_emitter_check.py     # exits non-zero on the first failed check

The step calls `codes_to_host` and `record_ready` right after encoding; the emitter thread waits on the event,
then reads the host buffers. Checked here: the host buffers are pinned; while the GPU is still busy with earlier
work the two calls return at once (the event not yet complete), so the step did not wait; on another thread,
after the event, the buffers equal the codes copied with a blocking `.cpu()`, and `to_csr` reads them.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import torch

from circuitwatch.fixtures.sae_writers import write_saelens
from circuitwatch.kernels import CodeSelection, SelectionMode, load_sae
from circuitwatch.kernels.encoders import make_encoder
from circuitwatch.plugin.device_copy import codes_to_host, record_ready


def check(condition: bool, what: str) -> None:
    print(f"{'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        raise SystemExit(1)


def main() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    d_in, d_sae = 4096, 65536
    with tempfile.TemporaryDirectory() as tmp:
        tensors = {
            "W_enc": (torch.randn(d_in, d_sae) / d_in**0.5).to(torch.bfloat16).float(),
            "b_enc": torch.randn(d_sae) * 0.1,
            "W_dec": torch.randn(d_sae, d_in),
            "b_dec": torch.zeros(d_in),
        }
        sae = load_sae(write_saelens(Path(tmp) / "sae", "topk", tensors, k=32))
    encoder = make_encoder(sae, CodeSelection(SelectionMode.TOPK, 32), "triton", device)
    x = torch.randn(256, d_in, device=device).to(torch.bfloat16)
    encoder.encode(x)  # compile
    busy = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(40):  # ~50 ms of GPU work queued ahead of the step's encode
        busy = busy @ busy / 90.0
    codes = encoder.encode(x)
    started = time.perf_counter()
    host = codes_to_host(codes)
    ready = record_ready()
    enqueue_ms = (time.perf_counter() - started) * 1e3
    still_running = not ready.query()
    check(all(t.is_pinned() for t in (host.ids, host.values, host.errors, host.norms)), "host buffers are pinned")
    check(still_running, f"the copies were enqueued behind the GPU's work in {enqueue_ms:.2f} ms, not waited for")
    seen: dict[str, object] = {}

    def emitter() -> None:  # what the plugin's sending thread does before packing
        ready.synchronize()
        seen["codes"] = tuple(t.clone() for t in (host.ids, host.values, host.errors, host.norms))
        seen["csr"] = host.to_csr()

    thread = threading.Thread(target=emitter)
    thread.start()
    thread.join()
    expected = (codes.ids.cpu(), codes.values.cpu(), codes.errors.cpu(), codes.norms.cpu())
    got = seen["codes"]
    same = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    check(same, "after the event the buffers hold the codes")
    offsets, ids, _ = seen["csr"]
    check(int(offsets[-1]) == int((expected[0] >= 0).sum()) and len(ids) == int(offsets[-1]), "to_csr reads them")


if __name__ == "__main__":
    main()
