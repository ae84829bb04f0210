"""GPU speed-ups that must not change results: checked on the CPU against segment-anything."""
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

from SAMFineTuneLib.acceleration import FusedAttention, fuse_attention, pad_batch


def small_vit():
    """A ViT shaped like SAM's (windowed and global blocks, relative positions), small enough for CI."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=4, out_chans=16,
                              use_rel_pos=True, window_size=3, global_attn_indexes=(1,))
    for module in encoder.modules():  # SAM starts them at zero; make them count
        if isinstance(module, Attention):
            module.rel_pos_h.data.normal_()
            module.rel_pos_w.data.normal_()
    return encoder.eval()


def test_fused_attention_gives_segment_anythings_output():
    encoder = small_vit()
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = encoder(images)
        assert fuse_attention(encoder) == 2
        got = encoder(images)
    assert all(type(m) is FusedAttention for m in encoder.modules() if isinstance(m, Attention))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_fusing_keeps_the_parameters_and_their_names():
    encoder = small_vit()
    before = {name: p.clone() for name, p in encoder.state_dict().items()}
    fuse_attention(encoder)
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_batches_are_padded_with_blank_images_up_to_the_compiled_size():
    images = torch.rand(3, 3, 8, 8)
    padded = pad_batch(images, 8)
    assert padded.shape == (8, 3, 8, 8)
    assert torch.equal(padded[:3], images) and not padded[3:].any()
    assert pad_batch(images, 2) is images


def test_compiling_on_a_cpu_is_a_clear_error(litemedsam):
    from SAMFineTuneLib.segmenter import Segmenter

    with pytest.raises(ValueError, match="compiling the encoder is for CUDA models"):
        Segmenter(litemedsam, compile=True)
