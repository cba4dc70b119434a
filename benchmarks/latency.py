"""Per-stage latency of one query with a committed checkpoint, its FLOPs and the share of this machine's
matmul peak it reaches; the mask stage with KV-cache reuse against re-running the whole sequence; and the
HiMTok head beside STAMP on the same backbone.

    python benchmarks/latency.py --model checkpoints/synthref-stamp [--himtok-model DIR] [--tokenizer DIR]
                                 [--repeats 20] [--json out.json]

Mask stage, per head (ms, median over ``--repeats`` after a warm-up):

- STAMP: one forward pass of the mask queries over the cached prefix, vs re-running prompt + answer first;
- HiMTok: the 32 constrained mask-token steps fed one at a time through the KV cache, plus the soft decode, vs
  recomputing the whole sequence at every step (no cache).

HiMTok uses ``--himtok-model`` when it is a checkpoint; otherwise a HiMTok head is put on the STAMP
checkpoint's backbone (its vision tower, projector and LM weights; the 1026 new token rows untrained) with the
mask tokenizer at ``--tokenizer``, or a RANDOMLY initialised one when none is trained yet (the table says
which). Timing does not depend on the weights; the masks do. The peak is measured in the same run, so ratios
stay meaningful on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.generation import DecodeSession, generate, start_session  # noqa: E402
from mmseg.imageio import load_image  # noqa: E402
from mmseg.modeling.builder import is_checkpoint  # noqa: E402
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


# -- STAMP -------------------------------------------------------------------------------------------------
def stamp_mask_stage(model, proc, prompt: list[int], answer_tokens: list[int], pixels: torch.Tensor,
                     repeats: int) -> tuple[float, float]:
    """(with KV reuse, re-running prompt + answer) ms of STAMP's mask pass at the answer's mask point."""
    seq = prompt + answer_tokens
    point = model.head.mask_point_token_id
    seg_index = len(prompt) + answer_tokens.index(point) if point in answer_tokens else len(seq) - 1
    session, hidden = start_session(model, [seq[: seg_index + 1]], pixels, pad_token_id=proc.pad_token_id)

    def with_reuse() -> None:
        session.mask_points, session.point_hidden = [[seg_index]], [[hidden[0, -1]]]
        model.head.decode(session)

    def without_reuse() -> None:
        fresh, fresh_hidden = start_session(model, [seq[: seg_index + 1]], pixels, pad_token_id=proc.pad_token_id)
        fresh.mask_points, fresh.point_hidden = [[seg_index]], [[fresh_hidden[0, -1]]]
        model.head.decode(fresh)

    return median_ms(with_reuse, repeats), median_ms(without_reuse, repeats)


# -- HiMTok ------------------------------------------------------------------------------------------------
def himtok_beside(stamp: Segmenter, tokenizer_dir: Path) -> tuple[Segmenter, str]:
    """A HiMTok model on the STAMP checkpoint's backbone; returns it and where its mask tokenizer came from."""
    from mmseg.modeling.builder import build_model
    from mmseg.modeling.heads.himtok import mask_token_names
    from mmseg.modeling.mask_tokenizer import MaskTokenizer, MaskTokenizerConfig
    from mmseg.processing import ensure_special_tokens

    if (tokenizer_dir / "mask_tokenizer_config.json").is_file():
        folder, source = tokenizer_dir, f"trained ({tokenizer_dir})"
    else:
        torch.manual_seed(0)
        folder = Path(tempfile.mkdtemp(prefix="himt-random-")) / "mask_tokenizer"
        MaskTokenizer(MaskTokenizerConfig()).save_pretrained(folder)
        source = f"RANDOMLY INITIALISED (no trained tokenizer at {tokenizer_dir}; timing is unaffected)"
    config = dataclasses.replace(stamp.model.saved_config(), head={"name": "himtok", "tokenizer": str(folder)})
    tokenizer = copy.deepcopy(stamp.processor.tokenizer)  # the STAMP segmenter keeps its own vocabulary
    ensure_special_tokens(tokenizer, mask_token_names(MaskTokenizer.from_pretrained(folder).config.codebook_size))
    model, processor = build_model(config, tokenizer, load_weights=False)
    new = model.state_dict()
    for name, value in stamp.model.state_dict().items():  # the shared backbone
        target = new.get(name)
        if target is None or name.startswith("head."):
            continue
        if value.shape == target.shape:
            target.copy_(value)
        elif value.ndim and value.shape[1:] == target.shape[1:]:  # vocabulary matrices: the old rows
            rows = min(value.shape[0], target.shape[0])
            target[:rows].copy_(value[:rows])
    return Segmenter(model.eval(), processor), source


def himtok_mask_stage(model, proc, prompt: list[int], prefix: list[int], pixels: torch.Tensor,
                      repeats: int) -> dict:
    """HiMTok's mask stage after the answer reached ``<mt_start>`` (``prefix`` ends with it): K constrained steps
    through the KV cache + decode, vs recomputing the whole sequence at every step + decode."""
    head = model.head
    k = head.num_tokens
    out_layer, embed = model.lm.get_output_embeddings(), model.lm.get_input_embeddings()
    features = model.image_features(pixels.to(model.device))
    session, hidden = start_session(model, [prompt + prefix], pixels, pad_token_id=proc.pad_token_id, features=features)
    saved = (session.cache_valid, session.cache_positions)
    one = torch.ones(1, 1, dtype=torch.bool, device=session.device)
    codes: dict[str, list[int]] = {}
    recorded: dict[str, dict] = {}  # the last cached run's per-step code distributions, for decode alone

    def reset(s: DecodeSession) -> None:
        s.tokens, s.state, s.options = [list(prefix)], {}, {}
        s.mask_points, s.point_hidden = [[len(prompt) + len(prefix) - 1]], [[hidden[0, -1]]]

    def cached() -> None:  # what generate() does inside a mask span
        reset(session)
        last, pos = hidden[:, -1:], session.cache_positions[:, -1:] + 1
        for _ in range(k):
            chosen = head.constrain(session, out_layer(last[:, -1]).float()).argmax(-1)
            session.tokens[0].append(int(chosen))
            last = head.after_step(session, session.feed(embed(chosen)[:, None], pos, one), chosen)
            pos = pos + 1
        head.decode(session)
        codes["cached"], recorded["state"] = session.tokens[0][len(prefix):], session.state
        session.cache.crop(-k)
        session.cache_valid, session.cache_positions = saved

    def recompute() -> None:
        tokens, state = list(prefix), {}
        for _ in range(k):
            fresh, fresh_hidden = start_session(model, [prompt + tokens], pixels, pad_token_id=proc.pad_token_id,
                                                features=features)
            fresh.tokens, fresh.state = [tokens], state
            tokens.append(int(head.constrain(fresh, out_layer(fresh_hidden[:, -1]).float()).argmax(-1)))
        fresh.tokens = [tokens]
        head.decode(fresh)
        codes["recompute"] = tokens[len(prefix):]

    def decode_only() -> None:
        head.decode(session)

    cached_ms = median_ms(cached, repeats)
    recompute_ms = median_ms(recompute, repeats)
    reset(session)
    session.tokens[0] += codes["cached"]
    session.state = recorded["state"]
    decode_ms = median_ms(decode_only, repeats)
    return {"mask_ms_kv_cache": cached_ms, "mask_ms_recompute": recompute_ms, "kv_speedup": recompute_ms / cached_ms,
            "decode_ms": decode_ms, "mask_tokens": k, "codes_match": codes["cached"] == codes["recompute"]}


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-stamp", help="the STAMP checkpoint")
    parser.add_argument("--himtok-model", default="checkpoints/synthref-himtok", help="a HiMTok checkpoint, if trained")
    parser.add_argument("--tokenizer", default="checkpoints/synthref-himtok/mask_tokenizer",
                        help="mask tokenizer for a HiMTok head on the STAMP backbone (random when missing)")
    parser.add_argument("--image", default="examples/synthref_0.png")
    parser.add_argument("--query", default="Please segment the cross.", help="a query whose object is in --image")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="benchmarks/results/latency.json")
    args = parser.parse_args()

    seg = Segmenter.from_pretrained(args.model, device="cpu")
    model, proc = seg.model, seg.processor
    pixels, _ = proc.preprocess_image(load_image(args.image))
    pixels = pixels[None]
    prompt = proc.encode_chat([{"role": "user", "content": args.query}])[0]
    kwargs = dict(eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id, max_new_tokens=seg.max_new_tokens)

    stages: dict[str, list[float]] = {}
    for _ in range(args.repeats + 1):
        for key, value in generate(model, [prompt], pixels, **kwargs).timings.items():
            stages.setdefault(key, []).append(value)
    stage_ms = {k: statistics.median(v[1:]) for k, v in stages.items()}
    answer_tokens = generate(model, [prompt], pixels, **kwargs).tokens[0]
    total_ms = median_ms(lambda: seg(args.image, args.query), args.repeats)
    flops = count_flops(lambda: seg(args.image, args.query))
    peak = matmul_peak_gflops(torch.float32)
    reuse_ms, rerun_ms = stamp_mask_stage(model, proc, prompt, answer_tokens, pixels, args.repeats)

    # HiMTok on the same backbone: the answer up to its mask point, with <seg> realised as <mt_start>.
    if is_checkpoint(args.himtok_model):
        himtok, source = Segmenter.from_pretrained(args.himtok_model, device="cpu"), f"checkpoint {args.himtok_model}"
    else:
        himtok, source = himtok_beside(seg, Path(args.tokenizer))
        source = f"{args.model} backbone + tokenizer {source}"
    head = himtok.model.head
    text = proc.decode(answer_tokens)
    before = text.split("<seg>")[0] if "<seg>" in text else text + " "
    prefix = himtok.processor.encode_model_text(before) + [head.mask_point_token_id]
    hiprompt = himtok.processor.encode_chat([{"role": "user", "content": args.query}])[0]
    himtok_result = himtok_mask_stage(himtok.model, himtok.processor, hiprompt, prefix, pixels, args.repeats)

    result = {
        "model": args.model, "head": seg.head_name, "query": args.query, "answer": text,
        "threads": torch.get_num_threads(), "stage_ms": stage_ms, "end_to_end_ms": total_ms,
        "query_gflops": flops / 1e9, "matmul_peak_gflops_fp32": peak,
        "peak_fraction": flops / 1e9 / (total_ms / 1000.0) / peak,
        "mask_ms_kv_reuse": reuse_ms, "mask_ms_rerun_sequence": rerun_ms, "reuse_speedup": rerun_ms / reuse_ms,
        "himtok": {"source": source, **himtok_result},
    }
    print(f"model {args.model} (head {seg.head_name}), {torch.get_num_threads()} threads, answer: {text!r}")
    print(f"{'stage':<28}{'median ms':>12}")
    for key, value in stage_ms.items():
        print(f"{key:<28}{value:>12.2f}")
    print(f"{'end to end (Segmenter)':<28}{total_ms:>12.2f}")
    print(f"query FLOPs {flops / 1e9:.3f} GFLOP; fp32 matmul peak {peak:.0f} GFLOP/s; "
          f"share of peak {result['peak_fraction']:.1%}")
    print()
    print(f"mask stage (median ms)                     {'KV cache':>10}{'no cache':>10}{'speedup':>9}")
    print(f"{'stamp: one query pass':<43}{reuse_ms:>10.2f}{rerun_ms:>10.2f}{rerun_ms / reuse_ms:>8.1f}x")
    h = himtok_result
    label = f"himtok: {h['mask_tokens']} token steps + decode"
    print(f"{label:<43}{h['mask_ms_kv_cache']:>10.2f}"
          f"{h['mask_ms_recompute']:>10.2f}{h['kv_speedup']:>8.1f}x")
    print(f"himtok soft decode alone {h['decode_ms']:.2f} ms; himtok / stamp (both cached) "
          f"{h['mask_ms_kv_cache'] / reuse_ms:.1f}x; cached and recomputed codes agree: {h['codes_match']}")
    print(f"himtok model: {source}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
