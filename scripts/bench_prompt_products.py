"""One quantized layer's prompt product by each path, against bfloat16 weights: milliseconds, medians of --runs.

    python scripts/bench_prompt_products.py                      # SmolLM2-1.7B's layer shapes, 64 and 512 rows
    python scripts/bench_prompt_products.py --shapes 1536x576 --rows 512

Paths: ATen's int4 / int8 kernels, the native tiles widened to bfloat16 into the float product ("tiles",
quantize.linear_from_tiles), the native int8-dot kernel (activations rounded per block of 32: decode only).
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import cli  # noqa: E402
import cpu_ops  # noqa: E402
import quantize  # noqa: E402
from cli import ArgumentParser, UsageError  # noqa: E402


def milliseconds(fn, runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument("--shapes", default="6144x2048,2048x2048,8192x2048,2048x8192", help="NxK, comma-separated")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--rows", default="64,512", help="prompt lengths, comma-separated")
    bench.add_argument("--runs", type=int, default=5, help="timed calls per path (the median is shown)")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
        rows_list = [int(rows) for rows in args.rows.split(",")]
    except ValueError:
        parser.error(f"--shapes takes NxK pairs (e.g. 8192x2048,2048x8192) and --rows whole numbers; got "
                     f"--shapes {args.shapes} --rows {args.rows}")
    if any(n < 16 or n % 16 or k < 32 or k % 32 for n, k in shapes) or any(r < 1 for r in rows_list) or args.runs < 1:
        parser.error("need N a multiple of 16, K a multiple of 32, rows and --runs at least 1")

    def run(_):
        if not cpu_ops.load():
            raise UsageError("the native CPU kernels could not be built here; see scripts/setup.sh")
        torch.manual_seed(0)
        print(f"{cpu_ops.cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print("| NxK | rows | bf16 weights | int4 ATen | int4 tiles | int4 native | int8 ATen | int8 tiles |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for N, K in shapes:
            shape = f"{N}x{K}"
            linear = torch.nn.Linear(K, N, bias=False)
            int4 = quantize.Int4Linear.from_linear(linear, 32)
            q = quantize.unpack_int4(int4.weight)
            tiles = cpu_ops.int4_tiles(q, int4.scales, int4.zeros)
            int4.prepare_for_device(torch.bfloat16)  # ATen's packing (no choices: the default path)
            int4.tiles, int4.tile_d, int4.tile_m = tiles
            int8 = quantize.Int8Linear.from_linear(linear)
            int8.prepare_for_device(torch.bfloat16)
            int8.tiles, int8.tile_scales = cpu_ops.int8_tiles(int8.weight, int8.scales)
            weight = linear.weight.detach().bfloat16()
            for rows in rows_list:
                x = torch.randn(rows, K, dtype=torch.bfloat16)
                times = [milliseconds(lambda: F.linear(x, weight), args.runs)]
                times += [milliseconds(lambda p=p: int4.run_path(p, x), args.runs) for p in ("aten", "tiles", "native")]
                times += [milliseconds(lambda p=p: int8.run_path(p, x), args.runs) for p in ("aten", "tiles")]
                print(f"| {shape} | {rows} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)

    cli.run(run)


if __name__ == "__main__":
    main()
