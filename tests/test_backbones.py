"""Real pretrained parts load by local folder (no hub): a Hugging Face LM + tokenizer and vision towers."""

import pytest
import torch

from mmseg.config import LMConfig, ModelConfig, VisionConfig
from mmseg.modeling.builder import build_model, build_tokenizer, load_pretrained
from mmseg.modeling.vision import build_vision_tower
from tiny import CORPUS


@pytest.fixture(scope="module")
def local_lm(tmp_path_factory):
    """A tiny Qwen2 LM with its own tokenizer written to a local folder, as a downloaded model would be."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mmseg.processing import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("lm")
    tok = train_bpe_tokenizer(CORPUS, 280)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok) - 3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64))
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hf_lm_by_folder_gets_new_tokens_at_the_mean(local_lm, tmp_path):
    config = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, width=16, layers=1, heads=2),
                         lm=LMConfig(name=str(local_lm)))
    tokenizer = build_tokenizer(config)
    model, proc = build_model(config, tokenizer)
    emb = model.lm.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    reloaded, _ = load_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.lm.get_input_embeddings().weight, emb)


def test_hf_clip_vision_tower_from_folder(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(tmp_path)
    tower = build_vision_tower(VisionConfig(kind="hf", name=str(tmp_path), feature_layer=-2))
    feats = tower(torch.randn(2, 3, 32, 32))
    assert tower.grid_size == (4, 4) and feats.shape == (2, 16, 24)  # CLS dropped


def test_hf_siglip_vision_tower_from_folder(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    tower = build_vision_tower(VisionConfig(kind="hf", name=str(tmp_path)))
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 16, 24)  # SigLIP has no CLS


def test_open_clip_named_architecture_with_local_weights(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-S-32", pretrained=None)  # architecture from open_clip's bundled config
    weights = tmp_path / "vit.pt"
    torch.save(model.state_dict(), weights)
    tower = build_vision_tower(VisionConfig(kind="open_clip", name="ViT-S-32", pretrained=str(weights), image_size=64))
    torch.testing.assert_close(tower.visual.conv1.weight, model.visual.conv1.weight)
    assert tower(torch.randn(1, 3, 64, 64)).shape == (1, 4, tower.hidden_size)


def test_unknown_vision_kind_and_architecture():
    with pytest.raises(ValueError, match="unknown vision kind"):
        build_vision_tower(VisionConfig(kind="timm"))
    with pytest.raises(ValueError, match="open_clip could not build"):
        build_vision_tower(VisionConfig(kind="open_clip", name="ViT-Nope-1"))


def test_conv_stem_tower_gives_the_patch_grid_and_sees_across_patch_borders():
    config = VisionConfig(kind="open_clip", image_size=64, patch_size=16, width=32, layers=1, heads=2, stem="conv")
    torch.manual_seed(0)
    tower = build_vision_tower(config).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = tower(x)
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    # The stem's own output for patch (0, 0) depends on pixels of the neighbouring patch (a linear patch
    # embedding's would not): the receptive field crosses the border.
    stem_out = tower.visual.conv1(x)
    assert stem_out.shape == (2, 32, 4, 4)
    (grad,) = torch.autograd.grad(stem_out[0, :, 0, 0].sum(), x)
    assert grad[0, :, :16, 16:].abs().sum() > 0 and grad[1].abs().sum() == 0


def test_bad_stems_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown vision stem 'resnet'.*'patch', 'conv'"):
        build_vision_tower(VisionConfig(kind="open_clip", stem="resnet"))
    with pytest.raises(ValueError, match="tiny open_clip towers"):
        build_vision_tower(VisionConfig(kind="open_clip", name="ViT-S-32", stem="conv"))
    with pytest.raises(ValueError, match="power-of-two patch size"):
        build_vision_tower(VisionConfig(kind="open_clip", image_size=60, patch_size=12, width=32, layers=1, heads=2,
                                        stem="conv"))


def test_open_clip_tower_gives_the_same_tokens_with_and_without_grad():
    """Training on a CPU runs the tower's attention with the math kernel (faster backward), inference with the
    default one: the two must agree."""
    config = VisionConfig(kind="open_clip", image_size=64, patch_size=16, width=32, layers=2, heads=2)
    torch.manual_seed(0)
    tower = build_vision_tower(config).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inference = tower(x)
    training = tower(x)
    assert training.requires_grad
    torch.testing.assert_close(training.detach(), inference, rtol=1e-4, atol=1e-5)
