"""``python -m eval``: clear errors, an end-to-end run with a real (tiny) checkpoint, two processes == one,
``compare``, and the throughput benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import main
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model, proc = tiny_model(seed=1)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def base(data, model, out, *extra):
    return ["refcoco", "--data-root", data, "--dataset", "synthref", "--split", "val", "--model", model,
            "--out", out, "--no-progress", *extra]


def test_missing_data_root_shows_the_tree(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, *base(tmp_path / "nowhere", ckpt, tmp_path / "o"))
    assert code == 2 and err.startswith("error: data root") and "does not exist" in err
    assert "refs(unc).p" in err and "instances.json" in err and "expected layout" in err


@pytest.mark.parametrize("content, message", [(b"\x80\x04 truncated", "could not be read as a pickle"),
                                              (pickle.dumps({"refs": []}), "must hold a list of refs"),
                                              (pickle.dumps([{"ref_id": 1}]), "lacks keys")])
def test_malformed_refs_file_fails_at_once_with_the_tree(capsys, tmp_path, ckpt, content, message):
    (tmp_path / "synthref").mkdir()
    (tmp_path / "synthref" / "refs(unc).p").write_bytes(content)
    (tmp_path / "synthref" / "instances.json").write_text('{"images": [], "annotations": []}')
    code, _, err = run(capsys, *base(tmp_path, ckpt, tmp_path / "o"))
    assert code == 2 and message in err and "expected layout" in err and "refcocog/" in err
    assert not (tmp_path / "o").exists()


def test_unknown_split_lists_the_valid_ones(capsys, tmp_path, ckpt, synthref_root):
    code, _, err = run(capsys, "refcoco", "--data-root", synthref_root, "--dataset", "synthref", "--split", "test",
                       "--model", ckpt, "--out", tmp_path / "o")
    assert code == 2 and "error: unknown split 'test' for synthref(unc); valid splits: testA, testB, train, val" in err


def test_checkpoint_errors(capsys, tmp_path, ckpt, synthref_root):
    code, _, err = run(capsys, *base(synthref_root, tmp_path, tmp_path / "o"))
    assert code == 2 and "not an mmseg checkpoint" in err
    code, _, err = run(capsys, *base(synthref_root, ckpt, tmp_path / "o", "--head", "himtok"))
    assert code == 2 and "has head 'stamp', not 'himtok'" in err
    code, _, err = run(capsys, *base(synthref_root, ckpt, tmp_path / "o", "--prompt", "Segment it."))
    assert code == 2 and "must contain {expression}" in err


@pytest.fixture(scope="module")
def one_process(ckpt, synthref_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    code = main([str(a) for a in base(synthref_root, ckpt, out, "--limit", 16, "--batch-size", 4, "--head", "stamp")])
    assert code == 0
    return out


def strip(path):
    metrics = json.loads((path / "metrics.json").read_text())
    metrics.pop("timing")
    return metrics


def lines(path):
    return [{k: v for k, v in json.loads(x).items() if k != "ms"} for x in (path / "predictions.jsonl").read_text().splitlines()]


def test_end_to_end_outputs_and_resume(capsys, one_process, ckpt, synthref_root, tmp_path):
    metrics = json.loads((one_process / "metrics.json").read_text())
    expected = {"ciou", "giou", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9", "box_acc@0.5",
                "no_target_acc", "n", "failures"}
    assert expected <= set(metrics) and metrics["n"] == 16
    p = metrics["protocol"]
    assert (p["dataset"], p["split"], p["split_by"], p["head"], p["prompt"], p["limit"]) == \
        ("synthref", "val", "unc", "stamp", "Please segment {expression}.", 16)
    assert [x["idx"] for x in lines(one_process)] == list(range(16))
    assert {"ref_id", "sent_id", "text", "rle", "intersection", "union"} <= set(lines(one_process)[0])
    assert "LISA" not in (one_process / "report.md").read_text() and (one_process / "report.html").stat().st_size > 1000
    code, out, _ = run(capsys, *base(synthref_root, ckpt, one_process, "--limit", 16, "--batch-size", 8))
    assert code == 0 and "0 samples this run" in out and "prompt: \"Please segment {expression}.\"" in out
    code, _, err = run(capsys, *base(synthref_root, ckpt, one_process, "--limit", 8))
    assert code == 2 and "different settings" in err and "limit: 16 in run.json, now 8" in err
    code, out, _ = run(capsys, "compare", one_process, one_process)
    assert code == 0 and out.count("| stamp |") == 2 and "complete" in out


def test_two_processes_equal_one(one_process, ckpt, synthref_root, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "eval",
           *map(str, base(synthref_root, ckpt, out, "--limit", 16, "--batch-size", 3))]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    two = json.loads((out / "metrics.json").read_text())
    assert two["timing"]["processes"] == 2
    assert strip(out) == strip(one_process) and lines(out) == lines(one_process)
    assert not list(out.glob("predictions.rank*"))


def _benchmark(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_runs(ckpt, synthref_root, tmp_path, capsys):
    result = _benchmark("eval_throughput").main(["--model", str(ckpt), "--data", str(synthref_root), "--n", "4",
                                                 "--json", str(tmp_path / "t.json")])
    assert [r["batch_size"] for r in result["rows"]] == [1, 16] and result["masks_identical"]
    assert json.loads((tmp_path / "t.json").read_text())["n"] == 4
    assert "| batch size | samples | seconds | samples/s |" in capsys.readouterr().out


def test_synthref_eval_no_refine_mask_needs_a_head_that_refines(ckpt, synthref_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _benchmark("synthref_eval").main(["--model", str(ckpt), "--data", str(synthref_root), "--no-refine-mask",
                                          "--json", str(tmp_path / "e.json")])
    assert "the stamp head" in capsys.readouterr().err and not (tmp_path / "e.json").exists()


def test_parquet_layout_from_the_command_line(capsys, ckpt, tmp_path):
    from test_eval_runner import write_parquet

    write_parquet(tmp_path / "RefCOCO")
    code, out, err = run(capsys, "refcoco", "--data-root", tmp_path / "RefCOCO", "--dataset", "refcoco", "--split", "val",
                         "--model", ckpt, "--out", tmp_path / "o", "--no-progress", "--limit", 3)
    assert code == 0 and "warning: the lmms-lab parquet 'val' split is NOT the UNC val" in err
    assert "layout parquet, 3 sentences" in out and "NOT the UNC val" in (tmp_path / "o" / "report.md").read_text()
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["protocol"]["layout"] == "parquet" and metrics["protocol"]["notes"]


def test_grounding_benchmark_reads_the_gate_per_type(synthref_root, tmp_path, capsys, monkeypatch):
    from mmseg.modeling.grounding import focus_cells

    bench = _benchmark("grounding")
    model, proc = tiny_model(seed=2, model_options={"image_position": "after", "ground_layer": 1, "ground_gate": True})
    model.save_pretrained(tmp_path / "gated")
    proc.save_pretrained(tmp_path / "gated")
    assert bench.main(["--model", str(tmp_path / "gated"), "--data", str(synthref_root), "--limit", "20",
                       "--json", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())["by_type"]
    assert result and all(row["n"] > 0 and 0 <= row["top_cell_hit"] <= 1 and 0 <= row["cell_iou"] <= 1
                          for row in result.values())
    assert "no_target" not in result and "top-cell hit" in capsys.readouterr().out
    # a gate that marks exactly the referent's cells scores 1 on both measures
    original = model.forward

    def perfect(batch):
        out = original(batch)
        grid = tuple(model.grounder.last_logits.shape[-2:])
        model.grounder.last_logits = focus_cells(batch["focus_targets"], grid) * 20 - 10
        return out

    monkeypatch.setattr(model, "forward", perfect)
    exact = bench.grounding_by_type(model, proc, synthref_root, limit=20)
    assert all(row["top_cell_hit"] == 1 and row["cell_iou"] == 1 for row in exact.values())
    plain, plain_proc = tiny_model(seed=3)
    plain.save_pretrained(tmp_path / "plain")
    plain_proc.save_pretrained(tmp_path / "plain")
    with pytest.raises(SystemExit, match="no grounding gate"):
        bench.main(["--model", str(tmp_path / "plain"), "--data", str(synthref_root)])


def test_description_benchmark_separates_naming_from_drawing(synthref_root, tmp_path, capsys, monkeypatch):
    from mmseg.data.prompts import EVAL_TEMPLATE, target_description
    from mmseg.data.refer import ReferDataset
    from mmseg.generation import answer_prefix_ids
    from mmseg.predictor import Answer, Segmenter

    bench = _benchmark("description")
    model, proc = tiny_model(seed=4)
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    assert bench.main(["--model", str(tmp_path / "m"), "--data", str(synthref_root), "--splits", "val",
                       "--limit", "8", "--json", str(tmp_path / "d.json")]) == 0
    row = json.loads((tmp_path / "d.json").read_text())["splits"]["val"]
    assert row["n"] == 8 and 0 <= row["named"] <= row["named_object"] <= 1 and 0 <= row["ciou_forced"] <= 1
    assert "ciou_forced" in capsys.readouterr().out
    # the forced answer ends at the head's mask point, after the description's words
    ids = answer_prefix_ids(proc, "Sure, the red circle on the left <seg>.", model.head.mask_point_token_id)
    assert ids[-1] == model.head.mask_point_token_id and "red circle on the left" in proc.decode(ids[:-1])
    # a two-step relational answer names its target after " it is ": the restated request never counts
    two_step = "The red star is at the top right, and the blue star left of it is the green circle on the left"
    assert bench.named_part(two_step) == "the green circle on the left"
    assert bench.named_part("Sure, the blue star at the top <seg>.") == "Sure, the blue star at the top <seg>."
    # answers that name the referent and draw its mask score 1 wherever they are read
    dataset = ReferDataset(synthref_root, "synthref", "unc", "val")
    truth = {(str(s.image_path), EVAL_TEMPLATE.format(expression=s.sentence)): s
             for s in (dataset[i] for i in range(len(dataset)))}

    def perfect(self, conversations, images, **options):
        samples = [truth[(str(path), conv[-1]["content"])] for conv, path in zip(conversations, images)]
        return [Answer(text=f"Sure, {target_description(s)} <seg>.", masks=[s.mask]) for s in samples]

    monkeypatch.setattr(Segmenter, "batch", perfect)
    exact = bench.described(Segmenter(model, proc), dataset, limit=8)
    assert exact["named"] == exact["named_object"] == exact["ciou_own"] == exact["ciou_named"] == 1.0
    assert exact["ciou_misnamed"] is None


def test_quick_evaluation_counts_answers_that_name_their_target(synthref_root):
    from mmseg.data.prompts import EVAL_TEMPLATE, target_description
    from mmseg.data.refer import ReferDataset
    from mmseg.evaluation import evaluate_refer
    from mmseg.predictor import Answer

    dataset = ReferDataset(synthref_root, "synthref", "unc", "val")
    truth = {(str(s.image_path), EVAL_TEMPLATE.format(expression=s.sentence)): s
             for s in (dataset[i] for i in range(len(dataset)))}

    class Scripted:  # answers every target sentence with its mask, naming the target or not
        def __init__(self, name: bool) -> None:
            self.name = name

        def batch(self, conversations, images, **options):
            samples = [truth[(str(path), conv[-1]["content"])] for conv, path in zip(conversations, images)]
            return [Answer(text=f"Sure, {target_description(s) if self.name else ''} <seg>.", masks=[s.mask])
                    for s in samples]

    described = [i for i in range(len(dataset)) if target_description(dataset[i]) is not None]
    assert described
    named = evaluate_refer(Scripted(True), dataset, described)
    unnamed = evaluate_refer(Scripted(False), dataset, described)
    assert named["named"] == 1.0 and unnamed["named"] == 0.0 and named["ciou"] == unnamed["ciou"] == 1.0
    no_target = [i for i in range(len(dataset)) if not dataset[i].has_target]
    assert no_target and evaluate_refer(Scripted(True), dataset, no_target)["named"] is None
