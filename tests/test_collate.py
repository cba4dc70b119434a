import random

import pytest
import torch

from mmseg.data.collate import Collator, ExamplePool
from mmseg.data.refer import ReferDataset, read_qa
from tiny import tiny_model


@pytest.fixture(scope="module")
def pool(synthref_root):
    ds = ReferDataset(synthref_root, "synthref", "unc", "train")
    return ExamplePool(ds, read_qa(synthref_root, "train"), ds.image_root)


def test_curriculum_draws_only_allowed_types(pool):
    rng = random.Random(0)
    for _ in range(50):
        ex = pool.draw(rng, qa_fraction=0.0, types=["attribute"])
        assert ex.mask is not None  # attribute expressions always have a target
    with pytest.raises(ValueError, match="match no samples"):
        pool.draw(rng, 0.0, ["nonsense"])


def test_collated_batch_matches_the_model_contract(pool):
    model, proc = tiny_model()
    rng = random.Random(1)
    batch = Collator(proc, model.head)([pool.draw(rng, 0.3) for _ in range(6)])
    b, t = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (b, 3, 64, 64) and batch["mask_targets"].shape == (b, 64, 64)
    for i in range(b):
        seg = int(batch["seg_positions"][i])
        if seg >= 0:
            assert batch["input_ids"][i, seg] == proc.seg_token_id and batch["mask_targets"][i].sum() > 0
            assert batch["labels"][i, seg] == proc.seg_token_id  # <seg> is a trained answer token
        assert (batch["input_ids"][i] == proc.image_token_id).sum() == proc.num_patches
    with torch.no_grad():
        assert torch.isfinite(model(batch)["loss"])
