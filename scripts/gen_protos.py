"""Generate the Python gRPC code for protos/cmx into libs/cmx (or --out DIR).

Run as `make protos`. The whole `cmx` package under the output dir is generated: it is deleted
first, so no stale module survives a removed .proto. Output is deterministic (same bytes on every
run), which tests/test_protos.py relies on to catch forgotten regenerations.
"""

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PACKAGE = "cmx"


def proto_files(root: Path = PROTO_ROOT) -> list[str]:
    """The .proto files under root/cmx, as sorted paths relative to root."""
    return sorted(p.relative_to(root).as_posix() for p in (root / PACKAGE).rglob("*.proto"))


def run_protoc(out: Path, files: list[str]) -> None:
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(files)}")


def add_init_files(out: Path) -> None:
    """Empty __init__.py in every generated package dir, so `cmx.npu.v1` is a regular package."""
    package_dir = out / PACKAGE
    for d in [package_dir, *sorted(p for p in package_dir.rglob("*") if p.is_dir())]:
        (d / "__init__.py").write_bytes(b"")


def generate(out: Path) -> list[Path]:
    """Regenerate out/cmx from scratch; returns the generated files, sorted."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / PACKAGE, ignore_errors=True)
    files = proto_files()
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE}")
    run_protoc(out, files)
    add_init_files(out)
    return sorted(p for p in (out / PACKAGE).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "libs", help="output root (default: libs)"
    )
    args = parser.parse_args(argv)
    generated = generate(args.out.resolve())
    print(f"generated {len(generated)} files under {args.out / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
