"""The latent-reasoning shaper against HiMTok alone, on SynthRef val and testB (the model writes its own answers).

    python benchmarks/shaper.py --model checkpoints/synthref-shaper --data data/synthref-s1 [--limit N]
                                [--himtok-model DIR] [--batch-size 1] [--precision bf16] [--json out.json]

Rows: the HiMTok checkpoint the shaper was trained from (``--himtok-model``, default the shaper's ``init_from``),
then the shaper with ``invoke`` = never / always / entropy / learned. Columns per split: cIoU and gIoU
(:mod:`mmseg.metrics` via :func:`mmseg.evaluation.evaluate_refer`); then invocations per mask and ms per query (the
predictor's ``total_ms``, averaged; with the default batch size 1 it is the latency of one query). "never" must
equal HiMTok: the shaper only adds work when it invokes.

Then the invoker's ceilings, per split, from the same runs' masks (no extra decoding): the cIoU an invoker would
reach if it chose, sentence by sentence, the best of never / always / entropy (the ceiling of an invoker that
picks one of those three behaviours per sentence), and if it shaped (always, or entropy) exactly where HiMTok's answer misnames its target (the
words before the mask differ from the target's description; an oracle no invoker sees). They tell whether a
better invoker could win anything, or the shaping rounds themselves would have to change.

With a ``mismatch_probe`` the probe's own figures follow (no oracle: rules an invoker could follow): its AUROC for
telling misnamed answers from named ones (sentences with a target whose answer opened a mask), and the cIoU of
shaping (always) only the masks whose probe probability exceeds 0.5 / 0.9.

Last, the learned invoker against never per split with its uncertainty: the cIoU difference and a 95% paired
bootstrap interval over sentences (both runs resampled with the same sentences; cIoU is a ratio of pooled sums, so
each resample re-pools them). A gain of a few thousandths needs thousands of sentences to resolve: at 200 per split
the interval spans several hundredths.

Results are written only for a TRAINED shaper (a folder ``mmseg train --config tiny-shaper`` finished, with its
``train_summary.json``); anything else is a clear error, so no placeholder numbers reach the results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.refer import ReferDataset  # noqa: E402
from mmseg.data.prompts import target_description  # noqa: E402
from mmseg.evaluation import evaluate_refer, predicted_mask  # noqa: E402
from mmseg.metrics import mask_iou_stats  # noqa: E402
from mmseg.modeling.builder import is_checkpoint  # noqa: E402
from mmseg.predictor import Segmenter  # noqa: E402

SPLITS = ("val", "testB")
MODES = ("never", "always", "entropy", "learned")
TRAIN_COMMAND = "mmseg train --config tiny-shaper --data DATA_ROOT --out {folder}"


class Recorder:
    """A segmenter that keeps every answer's mask infos and total time (for invocations and ms per query)."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter
        self.infos: list[dict] = []
        self.total_ms: list[float] = []
        self.answers: list = []

    def batch(self, conversations, images, **options):
        answers = self.segmenter.batch(conversations, images, **options)
        self.answers.extend(answers)
        for answer in answers:
            self.infos.extend(answer.info)
            self.total_ms.append(answer.timings["total_ms"])
        return answers


def check_trained_shaper(folder: Path) -> None:
    """A clear error unless ``folder`` is a shaper checkpoint whose training finished."""
    if not is_checkpoint(folder):
        raise SystemExit(f"error: no shaper checkpoint at {folder}; train one with `{TRAIN_COMMAND.format(folder=folder)}` "
                         "(results are only written for a trained shaper)")
    head = json.loads((folder / "config.json").read_text())["model"]["head"]
    if head.get("name") != "shaper":
        raise SystemExit(f"error: {folder} is a {head.get('name')!r} model, not a shaper")
    if not (folder / "train_summary.json").is_file():
        raise SystemExit(f"error: {folder} has no train_summary.json: its shaper training has not finished (re-run "
                         f"`{TRAIN_COMMAND.format(folder=folder)}` to resume it)")


def evaluate(recorder: Recorder, dataset: ReferDataset, indices: list[int], batch_size: int, autocast,
             **options) -> tuple[dict, list]:
    """One run's figures on ``indices``, and its answers in the order of ``indices``."""
    recorder.infos, recorder.total_ms, recorder.answers = [], [], []
    start = time.perf_counter()
    with autocast():
        result = evaluate_refer(recorder, dataset, indices, batch_size=batch_size, progress=True, **options)
    masks = max(1, len(recorder.infos))
    return {"ciou": result["ciou"], "giou": result["giou"], "n": result["n"],
            "invocations_per_mask": sum(i.get("invocations", 0) for i in recorder.infos) / masks,
            "masks": len(recorder.infos),
            "ms_per_query": sum(recorder.total_ms) / max(1, len(recorder.total_ms)),
            "seconds": round(time.perf_counter() - start, 1)}, recorder.answers


def misnames(answer, sample) -> bool:
    """Whether the answer's words miss the description of the sample's target (False without one)."""
    description = target_description(sample)
    return description is not None and description not in answer.text


def pooled_ratio(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Elementwise cIoU of pooled pixel sums; an empty union is agreement (1.0), as SegMetrics."""
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 1.0)


def pooled_ciou(chosen: np.ndarray) -> float:
    """cIoU of per-sentence ``[intersection, union]`` counts ``(N, 2)``."""
    return float(pooled_ratio(chosen[:, 0].sum(), chosen[:, 1].sum()))


def ceilings(stats: dict[str, np.ndarray], misnamed: np.ndarray) -> dict[str, float]:
    """The invoker's ceilings (module docstring) from per-sentence ``[intersection, union]`` pixel counts
    ``(N, 2)`` of each mode (never / always / entropy) and ``misnamed (N,)`` bool (HiMTok's answer misses its
    target's description).

    ``best_per_sentence`` is the highest cIoU that any choice of one mode per sentence reaches. cIoU is a ratio of
    sums, so it is found with Dinkelbach's iteration: given the current ratio r, each sentence takes the mode with
    the largest ``intersection - r * union`` (never on ties); the new choice's cIoU is the next r. It rises
    monotonically to the optimum, so the result is at least every single mode's cIoU.
    """
    options = np.stack([stats[m] for m in ("never", "always", "entropy")])  # (3, N, 2)
    rows = np.arange(options.shape[1])
    ratio = pooled_ciou(stats["never"])
    for _ in range(100):
        chosen = options[(options[..., 0] - ratio * options[..., 1]).argmax(0), rows]  # argmax keeps the first
        if pooled_ciou(chosen) <= ratio + 1e-12:
            break
        ratio = pooled_ciou(chosen)
    where_wrong = {m: np.where(misnamed[:, None], stats[m], stats["never"]) for m in ("always", "entropy")}
    return {"never": pooled_ciou(stats["never"]), "best_per_sentence": ratio,
            "always_where_misnamed": pooled_ciou(where_wrong["always"]),
            "entropy_where_misnamed": pooled_ciou(where_wrong["entropy"]), "misnamed": int(misnamed.sum())}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """cIoU(a) - cIoU(b) for per-sentence ``[intersection, union]`` counts ``(N, 2)`` of two runs on the same
    sentences, with the 2.5th / 97.5th percentiles of that difference over ``rounds`` resamples of the sentences
    (with replacement, the same draw for both runs) and the share of resamples in which it is positive."""
    n = len(a)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(np.float64)

    def resampled(counts: np.ndarray) -> np.ndarray:  # (rounds,) the pooled cIoU of each resample
        return pooled_ratio(weights @ counts[:, 0], weights @ counts[:, 1])

    diffs = resampled(a) - resampled(b)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": pooled_ciou(a) - pooled_ciou(b), "ci95_low": float(low), "ci95_high": float(high),
            "share_positive": float((diffs > 0).mean()), "sentences": n}


PROBE_GATES = (0.5, 0.9)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores (N,)`` for ``positive (N,)`` bool (the Mann-Whitney statistic, ties
    counting half); None without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(greater / (len(pos) * len(neg)))


def probe_figures(stats: dict[str, np.ndarray], misnamed: np.ndarray, described: np.ndarray,
                  wrong: np.ndarray) -> dict[str, float | None]:
    """The mismatch probe's figures from per-sentence ``[intersection, union]`` counts ``(N, 2)`` of never and always,
    ``misnamed (N,)`` and ``described (N,)`` bool (the sentence has a target description) and ``wrong (N,)``, the
    probe's probability for the sentence's first mask in the always run (NaN where no mask opened).

    ``probe_auroc``: how well the probe ranks misnamed answers above named ones; ``always_where_probe_T``: cIoU when
    exactly the masks with probability > T are shaped (never elsewhere), with ``shaped_where_probe_T`` of them."""
    scored = described & np.isfinite(wrong)
    out: dict[str, float | None] = {"probe_auroc": auroc(wrong[scored], misnamed[scored])}
    for gate in PROBE_GATES:
        shaped = np.nan_to_num(wrong, nan=0.0) > gate
        out[f"always_where_probe_{gate}"] = pooled_ciou(np.where(shaped[:, None], stats["always"], stats["never"]))
        out[f"shaped_where_probe_{gate}"] = int(shaped.sum())
    return out


@torch.no_grad()  # scoped: importing and calling main() leaves autograd as it was
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/synthref-shaper", help="a trained shaper checkpoint")
    parser.add_argument("--himtok-model", default=None, help="HiMTok checkpoint (default: the shaper's init_from)")
    parser.add_argument("--data", required=True, help="SynthRef root (use a seed the models were not trained on)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate every k-th sample so that at most N remain")
    parser.add_argument("--batch-size", type=int, default=1, help="1 = ms per query is single-query latency")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default="benchmarks/results/shaper.json")
    args = parser.parse_args(argv)

    folder = Path(args.model)
    check_trained_shaper(folder)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shaper = Segmenter.from_pretrained(folder, device=device)
    himtok_folder = Path(args.himtok_model or shaper.model.head.options().get("init_from") or "")
    if not is_checkpoint(himtok_folder):
        raise SystemExit(f"error: no HiMTok checkpoint at {himtok_folder!s} (the shaper's init_from); pass --himtok-model")
    himtok = Segmenter.from_pretrained(himtok_folder, device=device)
    if himtok.head_name != "himtok":
        raise SystemExit(f"error: {himtok_folder} is a {himtok.head_name!r} model, not a HiMTok one")

    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    runs = [("himtok", himtok, {})] + [(f"shaper {mode}", shaper, {"invoke": mode}) for mode in MODES]
    results: dict = {"model": str(folder), "himtok_model": str(himtok_folder), "data": args.data, "limit": args.limit,
                     "batch_size": args.batch_size, "precision": args.precision, "device": device,
                     "threads": torch.get_num_threads(), "runs": {}}
    results["ceilings"] = {}
    for split in SPLITS:
        dataset = ReferDataset(args.data, "synthref", "unc", split)
        step = max(1, len(dataset) // args.limit) if args.limit else 1
        indices = list(range(0, len(dataset), step))[: args.limit]
        samples = [dataset[i] for i in indices]
        stats: dict[str, np.ndarray] = {}
        for name, segmenter, options in runs:
            result, answers = evaluate(Recorder(segmenter), dataset, indices, args.batch_size, autocast, **options)
            results["runs"].setdefault(name, {})[split] = result
            if name == "himtok":
                # the words are the same in every mode (shaping only moves mask tokens); "named" as evaluate_refer
                misnamed = np.array([misnames(a, s) for s, a in zip(samples, answers)], dtype=bool)
                described = np.array([target_description(s) is not None for s in samples], dtype=bool)
            if options.get("invoke") in MODES:
                stats[options["invoke"]] = np.array(
                    [mask_iou_stats(predicted_mask(a, s.mask.shape), s.mask) for s, a in zip(samples, answers)],
                    dtype=np.float64).reshape(-1, 2)
            if options.get("invoke") == "always":
                wrong = np.array([a.info[0].get("words_wrong", np.nan) if a.info else np.nan for a in answers],
                                 dtype=np.float64)
        results["ceilings"][split] = ceilings(stats, misnamed)
        results.setdefault("learned_minus_never", {})[split] = paired_bootstrap(stats["learned"], stats["never"])
        if shaper.model.head.options().get("mismatch_probe"):
            results["ceilings"][split].update(probe_figures(stats, misnamed, described, wrong))

    header = "".join(f"{s + ' cIoU':>12}{s + ' gIoU':>12}" for s in SPLITS)
    print(f"{'run':<18}{header}{'calls/mask':>12}{'ms/query':>10}")
    for name, per_split in results["runs"].items():  # the last two columns pool both splits
        cells = "".join(f"{per_split[s]['ciou']:>12.4f}{per_split[s]['giou']:>12.4f}" for s in SPLITS)
        masks = sum(per_split[s]["masks"] for s in SPLITS)
        calls = sum(per_split[s]["invocations_per_mask"] * per_split[s]["masks"] for s in SPLITS) / max(1, masks)
        queries = sum(per_split[s]["n"] for s in SPLITS)
        ms = sum(per_split[s]["ms_per_query"] * per_split[s]["n"] for s in SPLITS) / max(1, queries)
        print(f"{name:<18}{cells}{calls:>12.2f}{ms:>10.1f}")
        per_split["all"] = {"invocations_per_mask": round(calls, 4), "ms_per_query": round(ms, 2)}
    print(f"\n{'invoker ceiling':<40}" + "".join(f"{s + ' cIoU':>12}" for s in SPLITS))
    for key, label in (("never", "never"), ("best_per_sentence", "best of never/always/entropy per sentence"),
                       ("always_where_misnamed", "always where the words are wrong"),
                       ("entropy_where_misnamed", "entropy where the words are wrong")):
        print(f"{label:<40}" + "".join(f"{results['ceilings'][s][key]:>12.4f}" for s in SPLITS))
    print("sentences whose words are wrong: " + ", ".join(f"{s} {results['ceilings'][s]['misnamed']}" for s in SPLITS))
    if "probe_auroc" in results["ceilings"][SPLITS[0]]:
        cell = lambda v: f"{v:>12.4f}" if v is not None else f"{'-':>12}"  # noqa: E731
        print(f"{'mismatch probe AUROC (misnamed)':<40}" + "".join(cell(results["ceilings"][s]["probe_auroc"])
                                                               for s in SPLITS))
        for gate in PROBE_GATES:
            print(f"{f'always where the probe says > {gate}':<40}"
                  + "".join(cell(results["ceilings"][s][f"always_where_probe_{gate}"]) for s in SPLITS)
                  + "   shaped " + ", ".join(str(results["ceilings"][s][f"shaped_where_probe_{gate}"]) for s in SPLITS))
    print()
    for split in SPLITS:
        d = results["learned_minus_never"][split]
        print(f"learned - never cIoU, {split}: {d['difference']:+.4f} (95% paired bootstrap over {d['sentences']} "
              f"sentences {d['ci95_low']:+.4f} to {d['ci95_high']:+.4f}; positive in {d['share_positive']:.0%})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"-> {args.json}")
    return results


if __name__ == "__main__":
    main()
