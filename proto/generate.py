"""Generate the Python protobuf and gRPC modules from proto/circuitwatch.proto.

Run by `make proto` and by setup.py's build step; the generated files are build output (git-ignored) and
never edited by hand. protoc names imports after the .proto's path under the include root, so the file is
staged as circuitwatch/proto/circuitwatch.proto to make the generated gRPC module import
`circuitwatch.proto.circuitwatch_pb2` rather than a bare top-level `circuitwatch_pb2`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "circuitwatch.proto"
GENERATED = ("circuitwatch_pb2.py", "circuitwatch_pb2.pyi", "circuitwatch_pb2_grpc.py")


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        staged = root / "circuitwatch" / "proto" / PROTO_FILE.name
        staged.parent.mkdir(parents=True)
        shutil.copyfile(PROTO_FILE, staged)
        include = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            str(staged.relative_to(root)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            # Written aside and renamed: `make test` builds two installs at once, and a reader of proto/ must
            # never see half a module.
            target = out_dir / name
            aside = out_dir / f".{name}.{os.getpid()}"
            shutil.copyfile(staged.parent / name, aside)
            os.replace(aside, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(f"generated {path}")
