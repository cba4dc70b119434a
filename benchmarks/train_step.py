"""Where a training step's time goes, and what the LM's attention kernel costs: SDPA against eager.

    python benchmarks/train_step.py --config tiny-stamp --data data/synthref-s0 [--steps 6] [--batch-size 32]

Builds the preset twice from the same seed (identical weights), once per attention implementation, and times
data (draw + collate), forward, backward and optimizer step under the preset's mixed precision, alternating the
two models step by step so that both see the same machine load (this machine is shared and noisy). Prints a
table, the eager/SDPA speed ratio measured in this run, and writes JSON
(default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mmseg.config import load_preset  # noqa: E402
from mmseg.data.collate import Collator, ExamplePool  # noqa: E402
from mmseg.data.refer import ReferDataset, read_qa  # noqa: E402
from mmseg.modeling.builder import build_model, build_tokenizer  # noqa: E402
from mmseg.perf import matmul_peak_gflops  # noqa: E402
from mmseg.train import text_corpus  # noqa: E402

PARTS = ("data", "forward", "backward", "optimizer")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny-stamp")
    parser.add_argument("--data", required=True, help="SynthRef root (holding synthref/ and images/)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)

    preset = load_preset(args.config)
    cfg = preset.train
    batch_size = args.batch_size or cfg.batch_size
    train_set = ReferDataset(args.data, "synthref", "unc", "train")
    qa = read_qa(args.data, "train")
    tokenizer = build_tokenizer(preset.model, text_corpus(train_set, qa), cfg.vocab_size)

    runs = {}
    for impl in ("sdpa", "eager"):
        config = dataclasses.replace(preset.model, lm=dataclasses.replace(preset.model.lm, attn_implementation=impl))
        torch.manual_seed(0)
        model, processor = build_model(config, tokenizer)
        model.train()
        collate = Collator(processor, model.head, patch_labels=model.probe.families if model.probe else None,
                           size_bins=config.patch_size_bins, focus=model.grounder is not None)
        runs[impl] = {"model": model, "collate": collate, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
                      "times": {p: [] for p in PARTS}}
    pool = ExamplePool(train_set, qa, train_set.image_root, describe_targets=cfg.describe_targets,
                       with_objects=model.probe is not None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)

    for step in range(args.steps + 1):
        for impl, run in runs.items():  # alternate, so both implementations share the machine's load
            t0 = time.perf_counter()
            rng = random.Random(step)
            batch = run["collate"]([pool.draw(rng, cfg.qa_fraction) for _ in range(batch_size)])
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = run["model"](batch)["loss"]
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if step:  # step 0 warms up allocators and caches
                for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    run["times"][part].append(seconds)

    rows = []
    for impl, run in runs.items():
        ms = {part: 1000 * sum(v) / len(v) for part, v in run["times"].items()}
        total = sum(ms.values())
        rows.append({"attn_implementation": impl, **{f"{p}_ms": round(v, 1) for p, v in ms.items()},
                     "step_ms": round(total, 1), "samples_per_s": round(1000 * batch_size / total, 1)})
    speedup = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"{args.config}, batch {batch_size}, {cfg.mixed_precision}, {torch.get_num_threads()} threads")
    print(f"{'attention':>10} " + " ".join(f"{p + ' ms':>12}" for p in PARTS) + f" {'step ms':>9} {'samples/s':>10}")
    for r in rows:
        print(f"{r['attn_implementation']:>10} " + " ".join(f"{r[p + '_ms']:>12.1f}" for p in PARTS)
              + f" {r['step_ms']:>9.1f} {r['samples_per_s']:>10.1f}")
    print(f"eager / sdpa training speed: {speedup:.2f}x (same run, alternating steps)")
    peak_dtype = dtype or torch.float32
    result = {"config": args.config, "batch_size": batch_size, "mixed_precision": cfg.mixed_precision,
              "steps": args.steps, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "matmul_peak_gflops": round(matmul_peak_gflops(peak_dtype), 1), "rows": rows,
              "eager_over_sdpa": round(speedup, 3)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
