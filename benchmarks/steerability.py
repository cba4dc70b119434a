"""How much a HiMTok model's code predictions listen to the input embedding at a code position: the shaper's lever.

    python benchmarks/steerability.py --model checkpoints/synthref-himtok --data data/synthref-s1 [--samples 16]
                                      [--scales 1 3 10] [--json benchmarks/results/steerability.json]

The shaper (:mod:`mmseg.modeling.heads.shaper`) steers mask-token decoding by adding a control vector to the input
embedding of the current mask token. That only works if the frozen LM's later code predictions depend on that
input. This script teacher-forces ``--samples`` val sentences with masks, shifts ONE input embedding by a random
direction of ``scale`` x the mean embedding norm, and reports how far the code distributions at and after that
position move (mean KL(base || shifted) per code position, and the share of code positions whose argmax changes),
for a shift at the last text token before ``<mt_start>``, at ``<mt_start>``, and at the inputs of codes 4 and 16.
A model trained with ``code_input_noise`` 1.0 (every input code random in training) learns to ignore what sits at
code positions, and the shift there moves little.

With a patch readout (``head.patch_readout``) the logits decoding uses are the LM's own code logits PLUS the
readout's terms, which are read from the image positions before ``<mt_start>`` and which no shift at or after
``<mt_start>`` reaches. The KL is reported for both (``kl_lm``: the LM's part alone; ``kl``: what decoding uses),
and a second table says how much each part carries: cross-entropy and accuracy on the true codes, and the spread
(std) of its centred logits.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmseg.data.collate import Collator, ExamplePool  # noqa: E402
from mmseg.data.refer import ReferDataset, read_qa  # noqa: E402
from mmseg.modeling.builder import load_pretrained  # noqa: E402

# Where the shift goes, as an offset from <mt_start>: -1 the last text token, 0 <mt_start>, 1 + i the input of code i.
SITES = {"text token": -1, "<mt_start>": 0, "code 4 input": 5, "code 16 input": 17}


@torch.no_grad()
def code_logits(model, batch: dict[str, torch.Tensor], shift_at: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced code logits at the K positions predicting the codes, with ``shift (B, D)`` added to the input
    embedding at ``shift_at (B,)``: ``(lm, readout)``, each ``(B, K, V)`` float; ``readout`` is zeros for a head
    without a patch readout. Decoding uses ``lm + readout``."""
    input_ids = batch["input_ids"]
    b = input_ids.shape[0]
    embeds, _ = model.embed_inputs(input_ids, pixel_values=batch["pixel_values"])
    if shift is not None:
        embeds = embeds.clone()
        embeds[torch.arange(b), shift_at] += shift.to(embeds.dtype)
    hidden = model.text_hidden(embeds, input_ids, batch["attention_mask"])
    head = model.head
    at = batch["seg_positions"][:, None] + torch.arange(head.num_tokens)
    lm = model.lm.get_output_embeddings()(hidden[torch.arange(b)[:, None], at]).index_select(
        -1, head.code_token_ids).float()
    readout = head.readout_logits(input_ids, hidden)
    return lm, torch.zeros_like(lm) if readout is None else readout


def _kl(base: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Per-position KL(base || shifted) of two logit tensors ``(B, K, V)`` -> ``(B, K)``."""
    base, shifted = base.log_softmax(-1), shifted.log_softmax(-1)
    return (base.exp() * (base - shifted)).sum(-1)


def logit_parts(lm: torch.Tensor, readout: torch.Tensor, targets: torch.Tensor) -> list[dict]:
    """What each part of the code logits carries: for the LM's part, the readout's and their sum, the cross-entropy
    and accuracy on ``targets (B, K)`` (code indices, -100 where none) and the std of the logits centred per
    position."""
    rows = []
    known = targets >= 0
    for name, logits in (("lm", lm), ("readout", readout), ("lm + readout", lm + readout)):
        centred = logits - logits.mean(-1, keepdim=True)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        rows.append({"part": name, "ce": round(float(ce), 4),
                     "accuracy": round(float((logits.argmax(-1) == targets)[known].float().mean()), 4),
                     "centred_std": round(float(centred.std()), 4)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a HiMTok checkpoint folder")
    parser.add_argument("--data", required=True, help="SynthRef root (holding synthref/ and images/)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/steerability.json")
    args = parser.parse_args(argv)

    # Seeded: the collator swaps input codes at random when the model was trained with code_input_noise, from
    # torch's generator; without a seed every run would teacher-force other inputs.
    torch.manual_seed(args.seed)
    model, processor = load_pretrained(args.model)
    if model.head.name != "himtok":
        raise SystemExit(f"{args.model} has a {model.head.name!r} head; this measures HiMTok models")
    model.eval()
    data = ReferDataset(args.data, "synthref", "unc", "val")
    pool = ExamplePool(data, read_qa(args.data, "val"), data.image_root, describe_targets=True)
    rng = random.Random(args.seed)
    examples = []
    while len(examples) < args.samples:  # sentences whose answer carries a mask
        example = pool.draw(rng, 0.0)
        if example.mask is not None and bool(example.mask.any()):
            examples.append(example)
    batch = Collator(processor, model.head)(examples)
    start = batch["seg_positions"]
    base_lm, base_readout = code_logits(model, batch)
    base = base_lm + base_readout
    head = model.head
    # targets from the labels, not the inputs: with code_input_noise the collator swaps the input codes
    labels = batch["labels"][torch.arange(len(examples))[:, None], start[:, None] + 1 + torch.arange(head.num_tokens)]
    parts = logit_parts(base_lm, base_readout, head.code_targets(labels))
    norm = float(model.lm.get_input_embeddings().weight.detach().norm(dim=-1).mean())
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for scale in args.scales:
        for site, offset in SITES.items():
            direction = F.normalize(torch.randn(len(examples), model.lm.config.hidden_size, generator=generator), dim=-1)
            lm, readout = code_logits(model, batch, start + offset, direction * norm * scale)
            shifted = lm + readout
            after = slice(max(0, offset), None)  # the code positions at and after the shifted input
            kl = _kl(base, shifted)[:, after]
            kl_lm = _kl(base_lm, lm)[:, after]
            flips = (base.argmax(-1) != shifted.argmax(-1))[:, after].float()
            rows.append({"scale": scale, "site": site, "kl": round(float(kl.mean()), 5),
                         "kl_lm": round(float(kl_lm.mean()), 5), "argmax_changed": round(float(flips.mean()), 4)})
    print(f"{args.model}: {len(examples)} teacher-forced val sentences, shift = scale x mean embedding norm ({norm:.3f})")
    print(f"{'scale':>6} {'shifted input':>15} {'KL per code':>12} {'KL, LM part':>12} {'argmax changed':>15}")
    for r in rows:
        print(f"{r['scale']:>6g} {r['site']:>15} {r['kl']:>12.4f} {r['kl_lm']:>12.4f} {r['argmax_changed']:>15.3f}")
    print(f"\n{'code logits':>13} {'CE':>7} {'accuracy':>9} {'centred std':>12}")
    for r in parts:
        print(f"{r['part']:>13} {r['ce']:>7.3f} {r['accuracy']:>9.3f} {r['centred_std']:>12.2f}")
    result = {"model": args.model, "data": args.data, "samples": len(examples), "embedding_norm": round(norm, 4),
              "code_input_noise": head.config.code_input_noise, "rows": rows, "logit_parts": parts}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
