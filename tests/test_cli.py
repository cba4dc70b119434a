"""The command line fails with one clear line, never a traceback."""

import pytest

from mmseg.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_preset(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", "huge", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown preset 'huge'" in err and "tiny-stamp" in err and "Traceback" not in err


def test_missing_data_root(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", "tiny-stamp", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert code == 2 and "refs(unc).p" in err


def test_predict_with_a_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    code, err = run(capsys, "predict", "--model", str(tmp_path), "--image", "x.png", "--query", "a", "--out", str(tmp_path / "p"))
    assert code == 2 and "not an mmseg checkpoint" in err


def test_predict_empty_query(capsys, tmp_path):
    code, err = run(capsys, "predict", "--model", str(tmp_path), "--image", "x.png", "--query", " ", "--out", str(tmp_path / "p"))
    assert code == 2 and "query is empty" in err


def test_predict_missing_and_corrupt_image(capsys, tmp_path):
    from tiny import tiny_model

    model, proc = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    code, err = run(capsys, "predict", "--model", str(tmp_path / "ckpt"), "--image", str(tmp_path / "no.png"), "--query", "a",
                    "--out", str(tmp_path / "p"))
    assert code == 2 and "image file not found" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    code, err = run(capsys, "predict", "--model", str(tmp_path / "ckpt"), "--image", str(bad), "--query", "a",
                    "--out", str(tmp_path / "p"))
    assert code == 2 and "cannot read image" in err


def test_synth_writes_layout(capsys, tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--train", "2", "--val", "1", "--test", "1"]) == 0
    assert (tmp_path / "synthref" / "refs(unc).p").is_file() and (tmp_path / "synthref" / "qa.json").is_file()


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "synth" in out and "train" in out and "predict" in out


def test_train_rejects_a_bad_override(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", "tiny-stamp", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--set", "train.batch_sise=8")
    assert code == 2 and "batch_sise" in err and "Traceback" not in err


def test_train_tokenizer_rejects_bad_settings(capsys, tmp_path, synthref_root):
    code, err = run(capsys, "train-tokenizer", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--set", "pixel_decoder=fancy")
    assert code == 2 and "valid: deconv, residual" in err and "Traceback" not in err
    code, err = run(capsys, "train-tokenizer", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                    "--train-part", "decoder")
    assert code == 2 and "--init FOLDER" in err
    code, err = run(capsys, "train-tokenizer", "--data", str(synthref_root), "--out", str(tmp_path / "o"),
                    "--init", str(tmp_path / "nowhere"), "--train-part", "decoder")
    assert code == 2 and "not a mask tokenizer folder" in err
