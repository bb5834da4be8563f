"""`cmx simulate --paper | --validate | --sensitivity`: the simulator against the paper's rows,
printed for a reader and returned as JSON (docs/simulator.md)."""
from __future__ import annotations

import dataclasses
import math

from cloudmatrix.simulator.calibration import CONSTANTS, FITTED
from cloudmatrix.simulator.gpu import GpuDecodeSetup, gpu_prefill_tokens_per_s, simulate_gpu_decode
from cloudmatrix.simulator.others import second_system_rows
from cloudmatrix.simulator.paper import BATCH_GRID, BOUND, Row, mean_kv_len, median_abs_error, paper_rows, slo_batches
from cloudmatrix.simulator.prefill import PrefillSetup
from cloudmatrix.simulator.validation import bands, leave_one_out, ranges, split_errors
from cloudmatrix.simulator.validation import sensitivity as sensitivity_of
from cloudmatrix.simulator.validation import validate as validated


def paper(with_bands: bool = False) -> dict:
    rows = paper_rows()
    band = bands(ranges(FITTED, leave_one_out())) if with_bands else {}
    _print_rows(rows, band)
    batches = slo_batches()
    _print_batches(batches)
    second = second_system(FITTED)
    errors = split_errors(rows)
    print(f"\nheld out: {errors['held_out_within']} of {errors['held_out']} within +-{BOUND:.0%}, median absolute "
          f"error {errors['held_out_median_abs_error']:.1%}, largest {errors['held_out_max_abs_error']:.1%}; "
          f"training: median {errors['train_median_abs_error']:.1%} (`cmx simulate --validate` for the calibration)")
    return {"rows": [r.as_dict() | ({"band": band[r.key]} if band else {}) for r in rows], "slo_batches": batches,
            "median_abs_error": median_abs_error(rows), "errors": errors,
            "calibration": FITTED.values(), "second_system": [r.as_dict() for r in second]}


def second_system(cal) -> list[Row]:
    """The other published deployments (H800, H100), held out completely: printed and returned."""
    rows = second_system_rows(cal)
    print("\nsecond system, held out completely (Hopper GPUs from public operator figures, no constant tuned):")
    _print_rows(rows, {})
    print(f"  {sum(bool(r.within) for r in rows)} of {len(rows)} within +-{BOUND:.0%}")
    return rows


def gpu(args) -> dict:
    """One decode or prefill configuration on Hopper GPUs (`--hardware h800|h100`)."""
    if args.tpot_slo or args.rate is not None or args.plot:
        raise ValueError("hardware: --tpot-slo, --rate and --plot are modeled for cloudmatrix384 only")
    imbalance = args.imbalance or (1.0 if args.eplb == "perfect" else FITTED.eplb_residual)
    if args.phase == "prefill":
        setup = PrefillSetup(prompt_len=args.prompt, tokens_per_die=max(args.prompt, args.tokens_per_npu),
                             dies=args.dies or 32, experts_per_die=math.ceil(288 / (args.dies or 32)),
                             attention_tp=1, int8=not args.no_int8, microbatches=args.microbatches or 2,
                             reuse=args.reuse, imbalance=imbalance)
        rate = gpu_prefill_tokens_per_s(setup, args.hardware)
        print(f"prefill on {args.hardware}, EP{setup.dies}, {setup.sequences} x {setup.prompt_len}-token prompts "
              f"per GPU: {rate:,.0f} tokens/s per GPU")
        return {"hardware": args.hardware, "setup": dataclasses.asdict(setup), "tokens_per_s_per_gpu": rate}
    ep = args.dies or 128
    setup = GpuDecodeSetup(batch=args.batch, kv_len=args.kv_len or mean_kv_len(args.prompt, args.output), ep=ep,
                           experts_per_gpu=math.ceil(288 / ep), mtp=not args.no_mtp, acceptance=args.acceptance,
                           microbatches=args.microbatches or 2, imbalance=imbalance)
    r = simulate_gpu_decode(setup, args.hardware)
    print(f"decode on {args.hardware}, EP{ep}, batch {setup.batch}/GPU, KV {setup.kv_len}, MTP "
          f"{'on' if setup.mtp else 'off'}, {setup.microbatches} microbatch(es): TPOT {r.tpot_s * 1e3:.1f} ms, "
          f"{r.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MoE layer {r.layer_s * 1e6:,.0f} us")
    print("    " + r.compute.table().replace("\n", "\n    "))
    print("    " + r.rounds.table().replace("\n", "\n    "))
    return {"hardware": args.hardware, "setup": dataclasses.asdict(setup), "tpot_ms": r.tpot_s * 1e3,
            "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu}


def validate() -> dict:
    report = validated()
    print("pre-registered constants (simulator/calibration.py), fitted on the training rows only:")
    for c in report["constants"]:
        low, high = c["range"]
        print(f"  {c['name']:<15} {_value(c['fitted'], c['unit'])} in [{_value(c['low'], c['unit'])}, "
              f"{_value(c['high'], c['unit'])}]; leave-one-out range {_value(low, c['unit'])} to "
              f"{_value(high, c['unit'])}")
        print(f"  {'':<15} {c['meaning']}; bounds: {c['bounds']}")
    refit = report["refit_from_prior"]
    print("refit from the prior: " + ", ".join(f"{k} {v:.4g}" for k, v in refit.items()))
    print(f"training rows: {', '.join(report['training'])}\n")
    rows = [Row(**{k: r[k] for k in Row.__dataclass_fields__}) for r in report["rows"]]
    _print_rows(rows, {r["key"]: tuple(r["band"]) for r in report["rows"]})
    print("\nleave-one-out (each training row predicted by the constants fitted on the other three):")
    for key, loo in report["leave_one_out"].items():
        print(f"  {key:<20} {loo['error']:+.1%}")
    _print_batches(report["slo_batches"])
    report["second_system"] = [r.as_dict() for r in second_system(FITTED)]
    e = report["errors"]
    print(f"\nheld out: {e['held_out_within']} of {e['held_out']} within +-{BOUND:.0%}, median absolute error "
          f"{e['held_out_median_abs_error']:.1%}, largest {e['held_out_max_abs_error']:.1%}; training median "
          f"{e['train_median_abs_error']:.1%}")
    return report


def sensitivity() -> dict:
    table = sensitivity_of()
    keys = list(next(iter(table.values())))
    print("each row's change with one constant at its lower / upper bound (the others as fitted):")
    print(f"{'row':<20} " + " ".join(f"{c.name:>23}" for c in CONSTANTS))
    for key in keys:
        print(f"{key:<20} " + " ".join(f"{table[c.name][key][0]:>+11.1%}/{table[c.name][key][1]:<+11.1%}"
                                       for c in CONSTANTS))
    return {name: {k: {"at_low": v[0], "at_high": v[1]} for k, v in rows.items()} for name, rows in table.items()}


def _print_rows(rows: list[Row], band: dict[str, tuple[float, float]]) -> None:
    print(f"{'table':<14} {'row':<44} {'metric':<22} {'paper':>9} {'model':>9} {'error':>8}  {'split':<9} bound"
          + ("  band" if band else ""))
    for r in rows:
        verdict = "-" if r.bound is None else f"+-{r.bound:.0%} {'ok' if r.within else 'MISSED'}"
        low_high = f"  {_figure(band[r.key][0])} - {_figure(band[r.key][1])}" if band else ""
        print(f"{r.table:<14} {r.label:<44} {r.metric:<22} {_figure(r.paper):>9} {_figure(r.predicted):>9} "
              f"{r.error:>+8.1%}  {r.split:<9} {verdict}{low_high}")
        if "tokens_per_s_per_npu" in r.shown:
            print(f"{'':<14}   tokens/s per NPU: paper {r.shown['paper_tokens_per_s_per_npu']:,.0f}, model "
                  f"{r.shown['tokens_per_s_per_npu']:,.0f} ({r.shown['microbatches']} microbatch(es))")


def _print_batches(batches: list[dict]) -> None:
    print(f"\nlargest batch within each TPOT SLO (sizes tried: multiples of {BATCH_GRID} per NPU; the model "
          f"chooses one or two microbatches):")
    for b in batches:
        found = (f"batch {b['predicted_batch_per_npu']} (TPOT {b['predicted_tpot_ms']:.1f} ms, "
                 f"{b['predicted_tokens_per_s_per_npu']:,.0f} tokens/s per NPU, "
                 f"{b['predicted_microbatches']} microbatch(es))") if b["predicted_tpot_ms"] \
            else f"no batch of {BATCH_GRID} or more meets it"
        verdict = "matches" if b["matches"] else "MISSED"
        print(f"  SLO {b['slo_ms']} ms, {b['prompt']}/{b['output']}: paper batch {b['paper_batch_per_npu']}, "
              f"model {found}: {verdict}")


def _value(v: float, unit: str) -> str:
    return f"{v * 1e6:.2f} us" if unit == "s" else f"{v:.3f}"


def _figure(value: float) -> str:
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"
