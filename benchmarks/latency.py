"""Per-stage latency of one query with a committed checkpoint, its FLOPs and the share of this machine's
matmul peak it reaches, and the mask stage with KV-cache reuse against re-running the whole sequence.

    python benchmarks/latency.py --model checkpoints/synthref-stamp [--repeats 20] [--json out.json]

Prints a table and writes JSON. Times are medians over ``--repeats`` runs after a warm-up; the peak is
measured in the same run, so ratios stay meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.generation import generate, start_session  # noqa: E402
from mmseg.imageio import load_image  # noqa: E402
from mmseg.perf import count_flops, matmul_peak_gflops  # noqa: E402
from mmseg.predictor import Segmenter  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-stamp")
    parser.add_argument("--image", default="examples/synthref_0.png")
    parser.add_argument("--query", default="Please segment the red circle.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="benchmarks/results/latency.json")
    args = parser.parse_args()

    seg = Segmenter.from_pretrained(args.model, device="cpu")
    model, proc = seg.model, seg.processor
    pixels, _ = proc.preprocess_image(load_image(args.image))
    pixels = pixels[None]
    prompt = proc.encode_chat([{"role": "user", "content": args.query}])[0]
    kwargs = dict(eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id, mask_token_id=proc.seg_token_id,
                  max_new_tokens=seg.max_new_tokens)

    stages: dict[str, list[float]] = {}
    for _ in range(args.repeats + 1):
        for key, value in generate(model, [prompt], pixels, **kwargs).timings.items():
            stages.setdefault(key, []).append(value)
    stage_ms = {k: statistics.median(v[1:]) for k, v in stages.items()}
    answer_tokens = generate(model, [prompt], pixels, **kwargs).tokens[0]
    total_ms = median_ms(lambda: seg(args.image, args.query), args.repeats)
    flops = count_flops(lambda: seg(args.image, args.query))
    peak = matmul_peak_gflops(torch.float32)

    # Mask stage with KV reuse (what the Segmenter does) vs without: re-run prompt + answer, then the mask pass.
    seq = prompt + answer_tokens
    has_mask = proc.seg_token_id in answer_tokens
    seg_index = len(prompt) + answer_tokens.index(proc.seg_token_id) if has_mask else len(seq) - 1
    session, hidden = start_session(model, [seq[: seg_index + 1]], pixels, pad_token_id=proc.pad_token_id)

    def with_reuse() -> None:
        session.mask_points, session.point_hidden = [[seg_index]], [[hidden[0, -1]]]
        model.head.decode(session)

    def without_reuse() -> None:
        fresh, fresh_hidden = start_session(model, [seq[: seg_index + 1]], pixels, pad_token_id=proc.pad_token_id)
        fresh.mask_points, fresh.point_hidden = [[seg_index]], [[fresh_hidden[0, -1]]]
        model.head.decode(fresh)

    reuse_ms = median_ms(with_reuse, args.repeats)
    rerun_ms = median_ms(without_reuse, args.repeats)

    result = {
        "model": args.model, "head": seg.head_name, "query": args.query, "answer": proc.decode(answer_tokens),
        "threads": torch.get_num_threads(), "stage_ms": stage_ms, "end_to_end_ms": total_ms,
        "query_gflops": flops / 1e9, "matmul_peak_gflops_fp32": peak,
        "peak_fraction": flops / 1e9 / (total_ms / 1000.0) / peak,
        "mask_ms_kv_reuse": reuse_ms, "mask_ms_rerun_sequence": rerun_ms, "reuse_speedup": rerun_ms / reuse_ms,
    }
    print(f"model {args.model} (head {seg.head_name}), {torch.get_num_threads()} threads, answer: {result['answer']!r}")
    print(f"{'stage':<28}{'median ms':>12}")
    for key, value in stage_ms.items():
        print(f"{key:<28}{value:>12.2f}")
    print(f"{'end to end (Segmenter)':<28}{total_ms:>12.2f}")
    print(f"query FLOPs {flops / 1e9:.3f} GFLOP; fp32 matmul peak {peak:.0f} GFLOP/s; "
          f"share of peak {result['peak_fraction']:.1%}")
    print(f"mask stage: KV reuse {reuse_ms:.2f} ms vs re-running the sequence {rerun_ms:.2f} ms "
          f"({result['reuse_speedup']:.1f}x faster with reuse)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
