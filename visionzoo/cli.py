"""The ``visionzoo`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

LISTABLE = ("models", "mixers", "recipes", "ops")
# handed to Lightning's CLI (visionzoo.training): recipes, overrides, --print_config
TRAINING_COMMANDS = ("fit", "validate", "test", "predict")


def _list(args: argparse.Namespace) -> int:
    import visionzoo
    from visionzoo.kernels import list_ops

    listings = {
        "models": visionzoo.list_models,
        "mixers": visionzoo.list_mixers,
        "recipes": visionzoo.list_recipes,
        "ops": list_ops,
    }
    for name in listings[args.what]():
        print(name)
    return 0


def _bench_models(args: argparse.Namespace) -> int:
    import torch

    from visionzoo.bench import bench_model, format_model_timings, plot_model_timings, write_model_csv

    names = [*args.models, *(args.compare or [])]
    size = tuple(args.img_size) if args.img_size else None
    batch = args.batch or 32
    autocast = None if args.dtype == "float32" else getattr(torch, args.dtype)  # models: mixed precision
    modes = [None] + ([args.compile] if args.compile else [])  # each model eager, then compiled

    def bench(name: str, mode: str | None):
        return bench_model(
            name, args.device, size, batch, not args.forward_only, args.min_run_time, autocast, mode, args.channels_last
        )

    rows = [bench(name, mode) for name in names for mode in modes]
    print(format_model_timings(rows, baseline=args.compare[0] if args.compare else None))
    if args.csv:
        with open(args.csv, "w", newline="") as stream:
            write_model_csv(rows, stream)
    if args.chart:
        left_out = plot_model_timings(rows, args.chart, args.chart_x)
        if left_out:
            print(f"not in {args.chart}: {', '.join(left_out)} (no paper top-1)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import timm

    unknown = [name for name in [*args.models, *(args.compare or [])] if not timm.is_model(name)]
    if unknown:
        print(f"error: unknown model {', '.join(unknown)} (visionzoo list models: ours)", file=sys.stderr)
        return 2
    try:
        if args.onnx:
            return _bench_onnx(args)
        return _bench_models(args) if args.models else _bench_ops(args)
    except ValueError as error:  # an unknown op, mixer, case or backend; an ONNX file without a fixed size
        print(f"error: {error}", file=sys.stderr)
        return 2


def _bench_onnx(args: argparse.Namespace) -> int:
    from visionzoo.bench.onnx import bench_onnx, format_onnx_timings

    missing = [path for path in args.onnx if not Path(path).is_file()]
    if missing:
        print(f"error: no ONNX file at {', '.join(missing)}", file=sys.stderr)
        return 2
    size = tuple(args.img_size) if args.img_size else None
    rows = [bench_onnx(path, size, args.batch or 32, args.min_run_time) for path in args.onnx]
    print(format_onnx_timings(rows))
    return 0


def _bench_ops(args: argparse.Namespace) -> int:
    import torch

    from visionzoo.bench import MARKDOWN_HEADER, OP_CASES, RunSettings, bench_mixer, bench_op, markdown_row, write_csv

    print(MARKDOWN_HEADER, flush=True)
    settings = RunSettings(
        device=args.device,
        dtype=getattr(torch, args.dtype),
        backward=not args.forward_only,
        min_run_time=args.min_run_time,
        batch=args.batch,
        on_row=lambda row: print(markdown_row(row), flush=True),
    )
    rows = []
    for name in args.mixer or []:
        rows += bench_mixer(name, settings)
    for name in args.op or ([] if args.mixer else list(OP_CASES)):
        rows += bench_op(name, settings, cases=args.case, backends=args.backend)
    if args.csv:
        with open(args.csv, "w", newline="") as stream:
            write_csv(rows, stream)
    return 0


def _stats(args: argparse.Namespace) -> int:
    import visionzoo
    from visionzoo.stats import format_model_markdown, model_stats

    names = sorted({name for pattern in args.patterns for name in visionzoo.list_models(pattern)})
    if not names:
        print(f"no visionzoo model matches {args.patterns}", file=sys.stderr)
        return 1
    size = (args.img_size, args.img_size) if args.img_size else None
    print(format_model_markdown([model_stats(name, size) for name in names]))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from visionzoo.checkpoints import load_model
    from visionzoo.explain import explain, explain_attention

    if not args.attention and (args.query or args.block):
        print("error: --query and --block go with --attention", file=sys.stderr)
        return 2
    if args.attention and args.class_index is not None:
        print("error: --class-index goes with Grad-CAM, not --attention", file=sys.stderr)
        return 2
    size = tuple(args.img_size) if args.img_size else None
    try:
        model = load_model(args.model, args.checkpoint)
        if args.attention:
            result = explain_attention(model, args.image, args.out, args.query, args.block, size)
        else:
            result = explain(model, args.image, args.out, args.class_index, size)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"predicted class {result.predicted} (probability {result.probability:.3f})")
    if args.attention:
        row, col = result.query
        print(f"wrote {result.path}: attention of token ({row}, {col}) in block {result.block}, mean over heads")
    else:
        print(f"wrote {result.path}: Grad-CAM of class {result.class_index} at {result.layer}")
    return 0


# checked with --dynamic beside the export size and the model's own: they pad to other window, region and
# pool multiples
DEFAULT_CHECK_SIZES = ((97, 75), (320, 256), (64, 64), (417, 403))


def _check_sizes(args: argparse.Namespace, model, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The export size, then (``--dynamic``) the model's own and ``--check-size`` or the default sizes, those
    the model accepts, each once."""
    from visionzoo.checkpoints import is_detector
    from visionzoo.export import default_input_size, min_input_size

    if not args.dynamic:
        return [size]
    extra = [tuple(s) for s in args.check_size] if args.check_size else DEFAULT_CHECK_SIZES
    sizes = [size, default_input_size(model), *extra]
    if not is_detector(model):
        min_h, min_w = min_input_size(model)
        sizes = [(h, w) for h, w in sizes if h >= min_h and w >= min_w]
    return list(dict.fromkeys(sizes))


def _export(args: argparse.Namespace) -> int:
    from visionzoo.checkpoints import is_detector, load_model
    from visionzoo.export import check_onnx, default_input_size, export_onnx

    if args.int8 and not args.calibration:
        print("error: --int8 needs --calibration RECIPE (its val split calibrates the ranges)", file=sys.stderr)
        return 2
    args.dynamic = args.dynamic or args.int8  # calibration and test batches of any size
    try:
        model = load_model(args.model, args.checkpoint)
        if args.int8 and is_detector(model):
            raise ValueError("--int8 serves classifiers and segmenters, not torchvision detectors")
        size = tuple(args.img_size or default_input_size(model, args.dynamic))
        name = args.model or model.pretrained_cfg.get("architecture", "model")
        if not hasattr(model, "num_classes"):  # a detector or a segmenter over the backbone `name`
            name = f"{name}_{type(model).__name__.lower()}"
        path = export_onnx(model, args.output or f"{name}.onnx", size, dynamic=args.dynamic)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # export_onnx raises ExportError, a RuntimeError
        print(f"error: {error}", file=sys.stderr)
        return 2
    batch = (
        "one image (a torchvision detector)" if is_detector(model) else "dynamic batch" if args.dynamic else "batch 2"
    )
    shape = "dynamic HxW" if args.dynamic else f"static {size[0]}x{size[1]}"
    print(f"wrote {path} ({batch}, {shape})")
    if args.no_check:
        return _export_int8(args, path) if args.int8 else 0
    try:
        results = check_onnx(model, path, _check_sizes(args, model, size), tolerance=args.tolerance)
    except RuntimeError as error:  # ExportError: the file does not load
        print(f"error: {error}", file=sys.stderr)
        return 2
    for result in results:
        if result.ok:
            print(f"onnxruntime matches torch at {result.describe()} (ok)")
    failed = [result.describe() for result in results if not result.ok]
    if failed:
        print(
            f"error: {path} differs from torch (tolerance {args.tolerance:g}) at {'; '.join(failed)}", file=sys.stderr
        )
        return 2
    return _export_int8(args, path) if args.int8 else 0


def _export_int8(args: argparse.Namespace, path) -> int:
    """Quantize the exported file, calibrated on the recipe's val split; compare it with the float file on the
    test split (else val)."""
    from visionzoo.quantize import compare_onnx, quantize_onnx, recipe_data

    int8_path = path.with_name(f"{path.stem}.int8.onnx")
    try:
        data = recipe_data(args.calibration, args.calibration_root, args.calibration_batch_size)
        quantize_onnx(path, int8_path, data.val_dataloader(), args.calibration_batches, args.calibration_method)
        try:
            split, loader = "test", data.test_dataloader()
        except ValueError:  # no test split: the val split
            split, loader = "val", data.val_dataloader()
        comparison = compare_onnx(path, int8_path, loader)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # QuantizeError, UnsafeRecipeError, a split
        print(f"error: {error}", file=sys.stderr)
        return 2
    sizes = [p.stat().st_size / 2**20 for p in (path, int8_path)]
    print(f"wrote {int8_path} (int8, {sizes[1]:.2f} MiB against {sizes[0]:.2f} MiB float)")
    print(f"int8 against float on the {split} split: {comparison.describe()}")
    if comparison.agreement < args.int8_min_agreement:
        print(
            f"error: {int8_path} agrees with the float model on {comparison.agreement:.2%} of top-1 predictions, "
            f"under --int8-min-agreement {args.int8_min_agreement:.2%}",
            file=sys.stderr,
        )
        return 2
    return 0


def _fashion_scenes(args: argparse.Namespace) -> int:
    from visionzoo.data.scenes import scene_baselines, write_fashion_scenes

    counts = dict(train=args.train, val=args.val, test=args.test)
    try:
        garments = write_fashion_scenes(args.source, args.out, counts=counts, seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, count in counts.items():
        print(f"{split}: {count} canvases, {garments[split]} garments")
    if args.test:
        baselines = scene_baselines(args.out, "test")
        print("untrained baselines on the test split: " + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()))
    print(f"written under {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionzoo", description="visionzoo: vision backbones for timm.")
    commands = parser.add_subparsers(dest="command", required=True)
    for verb in TRAINING_COMMANDS:  # listed for --help; main() hands them to Lightning's CLI
        commands.add_parser(verb, help=f"{verb} with a recipe: visionzoo {verb} --config RECIPE.yaml [--help]")
    listing = commands.add_parser("list", help="list registered models, mixers, kernel ops or packaged recipes")
    listing.add_argument("what", choices=LISTABLE)
    listing.set_defaults(run=_list)

    bench = commands.add_parser(
        "bench", help="time models (against --compare), kernel backends, or our mixers against timm's layers"
    )
    bench.add_argument("models", nargs="*", help="models to time: latency, throughput, memory, params, GMACs")
    bench.add_argument("--compare", action="append", help="timm model timed alongside; ratios are against the first")
    bench.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="model input (default: model's)")
    bench.add_argument("--onnx", action="append",
                       help="ONNX file to time in onnxruntime (repeatable; ratios against the first)")  # fmt: skip
    bench.add_argument("--op", action="append", help="kernel op to time (repeatable; default: all with cases)")
    bench.add_argument("--mixer", action="append", help="mixer to time against timm's layer (repeatable)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                       help="ops: the inputs' dtype; models: autocast to it (default float32)")  # fmt: skip
    bench.add_argument("--forward-only", action="store_true", help="skip the forward+backward (training) timings")
    bench.add_argument("--batch", type=int, help="override every case's batch size (models: default 32)")
    bench.add_argument("--case", action="append", help="only cases whose label contains this (repeatable)")
    bench.add_argument("--backend", action="append", help="ops: only this backend or formulation (repeatable)")
    bench.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed runs per figure")
    bench.add_argument("--csv", help="also write the rows to this CSV file")
    bench.add_argument("--chart", help="models: also draw throughput against GMACs (or --chart-x) into this PNG")
    bench.add_argument("--chart-x", default="gmacs", choices=("gmacs", "top1"), help="chart's x axis")
    bench.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="models: also time each under torch.compile (this mode), ratios against its eager run",
    )
    bench.add_argument("--channels-last", action="store_true", help="models: channels-last model and inputs")
    bench.set_defaults(run=_bench)

    stats = commands.add_parser("stats", help="parameters and GMACs of models, as a markdown table")
    stats.add_argument("patterns", nargs="*", default=["*"], help="model name patterns (default: all)")
    stats.add_argument("--img-size", type=int, help="square input size (default: each model's input_size)")
    stats.set_defaults(run=_stats)

    export = commands.add_parser("export", help="export a model to ONNX and check it in onnxruntime")
    export.add_argument("model", nargs="?", help="registered model name (optional with a visionzoo fit checkpoint)")
    export.add_argument("--checkpoint", help="weights: .safetensors, or a torch/Lightning checkpoint")
    export.add_argument("-o", "--output", help="ONNX file (default: MODEL.onnx)")
    export.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="export size (default: model's)")
    export.add_argument("--dynamic", action="store_true", help="free batch, height and width in the graph")
    export.add_argument("--check-size", type=int, nargs=2, action="append", metavar=("H", "W"),
                        help="size checked in onnxruntime with --dynamic, besides the export size and the model's "
                        "(repeatable; default: 97x75, 320x256, 64x64, 417x403, those the model accepts)")  # fmt: skip
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed (default: 1e-4)")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    export.add_argument("--int8", action="store_true", help="also write MODEL.int8.onnx: static int8 (QDQ) "
                        "calibrated on --calibration's val split (implies --dynamic)")  # fmt: skip
    export.add_argument("--calibration", metavar="RECIPE", help="--int8: the recipe whose data calibrates")
    export.add_argument("--calibration-root", metavar="DIR", help="--int8: the recipe's data root replaced")
    export.add_argument("--calibration-batches", type=int, default=16, help="--int8: val batches (default 16)")
    export.add_argument("--calibration-batch-size", type=int, help="--int8: the recipe's batch size replaced")
    export.add_argument("--calibration-method", default="minmax", choices=("minmax", "entropy", "percentile"))
    export.add_argument("--int8-min-agreement", type=float, default=0.9,
                        help="--int8: least share of top-1 equal to the float model's (default 0.9)")  # fmt: skip
    export.set_defaults(run=_export)

    data = commands.add_parser("data", help="write a dataset").add_subparsers(dest="dataset", required=True)
    scenes = data.add_parser("fashion-scenes", help="Fashion-MNIST garments on canvases: COCO JSON + label PNGs")
    scenes.add_argument("--out", required=True, help="dataset folder to write")
    scenes.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files")
    scenes.add_argument("--seed", type=int, default=0)
    scenes.add_argument("--train", type=int, default=6000, help="training canvases (default 6000)")
    scenes.add_argument("--val", type=int, default=500, help="validation canvases (default 500)")
    scenes.add_argument("--test", type=int, default=1000, help="test canvases (default 1000)")
    scenes.set_defaults(run=_fashion_scenes)

    explain = commands.add_parser("explain", help="draw Grad-CAM, or one query's attention, over an image")
    explain.add_argument("model", nargs="?", help="registered model name (optional with a visionzoo fit checkpoint)")
    explain.add_argument("--image", required=True, help="the image to explain")
    explain.add_argument("--out", required=True, help="PNG to write, at the image's size")
    explain.add_argument("--checkpoint", help="weights: .safetensors, or a torch/Lightning checkpoint")
    explain.add_argument("--class-index", type=int, help="class to explain (default: the predicted one)")
    explain.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="model input (default: model's)")
    explain.add_argument("--attention", action="store_true",
                         help="draw one query's attention weights instead (neighborhood, routing, global)")  # fmt: skip
    explain.add_argument("--query", type=int, nargs=2, metavar=("Y", "X"), help="query pixel (default: the centre)")
    explain.add_argument("--block", help="STAGE.INDEX (default: last block of the first stage with attention)")
    explain.set_defaults(run=_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        from visionzoo.training import run_cli

        return run_cli(argv)
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
