"""`cmx quantize`: turn a float checkpoint into an INT8 W8A8 checkpoint (docs/int8.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from cloudmatrix.checkpoints import load_model
from cloudmatrix.model.config import load_config
from cloudmatrix.quant.calibrate import checkpoint_calibration_prompts
from cloudmatrix.quant.int8_checkpoint import is_int8_checkpoint, save_int8_checkpoint
from cloudmatrix.quant.quantize_model import QuantReport, QuantSettings, quantize_model
from cloudmatrix.quant.smooth import DEFAULT_ALPHA


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="write an INT8 (W8A8) copy of a checkpoint")
    parser.add_argument("--checkpoint", required=True, help="float checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory for the INT8 checkpoint")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="smoothing migration strength in [0, 1]")
    parser.add_argument("--no-smooth", action="store_true", help="no outlier smoothing")
    parser.add_argument("--no-clip", action="store_true", help="no clipping search (clip ratio 1)")
    parser.add_argument("--calib-samples", type=int, default=QuantSettings.calib_samples,
                        help="calibration prompts (a trained checkpoint: windows of its training text; "
                        "else half shipped corpus, half random ids)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random calibration prompts and samples")
    parser.set_defaults(handler=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    if is_int8_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint} is already an INT8 checkpoint; pass a float one")
    settings = QuantSettings(alpha=args.alpha, smooth=not args.no_smooth, clip=not args.no_clip,
                             calib_samples=args.calib_samples, seed=args.seed)
    # The MTP module, when the checkpoint has one, is quantized like every other layer.
    model = load_model(args.checkpoint, mtp=bool(load_config(args.checkpoint).num_nextn_predict_layers))
    prompts = checkpoint_calibration_prompts(args.checkpoint, model.cfg.vocab_size, settings.calib_samples,
                                             settings.calib_seq_len, settings.seed)
    report = quantize_model(model, prompts, settings)
    out = save_int8_checkpoint(model, args.out, args.checkpoint, settings)
    print(_summary(report, settings, Path(args.checkpoint), out))
    return 0


def _file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _summary(report: QuantReport, settings: QuantSettings, source: Path, out: Path) -> str:
    smoothing = f"alpha {settings.alpha}" if settings.smooth else "off"
    before, after = _file_bytes(source), _file_bytes(out)
    return "\n".join([
        f"wrote INT8 W8A8 checkpoint to {out}",
        (f"  layers quantized: {report.quantized} linear; kept float: {report.kept_float} "
         "(routers, kv_b_proj, lm_head; embeddings and norms too)"),
        f"  size: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / before:.2f}x)",
        f"  calibration: {report.calibration_tokens} tokens ({settings.calib_samples} prompts x {settings.calib_seq_len})",
        (f"  smoothing: {smoothing}; clipping: {'on' if settings.clip else 'off'}, "
         f"{100 * report.clipped_channels:.1f}% of channels clipped"),
        f"  time: {report.seconds:.1f} s",
    ])
