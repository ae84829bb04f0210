"""Encoder and decoder speed-ups that must not change results, checked on the CPU (against
segment-anything's attention, eager execution and float32)."""
import copy

import pytest
import torch
from torch.nn import functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT
from segment_anything.modeling.transformer import Attention as DecoderAttention

from SAMFineTuneLib.acceleration import (FusedAttention, FusedDecoderAttention, cpp_compiler, fold_batch_norms,
                                         fuse_attention, pad_batch)


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


def conv_bn(a, b, **conv):
    """A convolution and its batch norm with running statistics far from the identity."""
    layers = torch.nn.Sequential(torch.nn.Conv2d(a, b, bias=False, **conv), torch.nn.BatchNorm2d(b))
    for stat in (layers[1].running_mean, layers[1].weight, layers[1].bias):
        stat.data.normal_()
    layers[1].running_var.data.uniform_(0.1, 3.0)
    return layers


def test_folded_batch_norms_give_the_same_output_and_leave_no_batch_norm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(conv_bn(3, 8, kernel_size=3, padding=1), torch.nn.GELU(),
                              conv_bn(8, 8, kernel_size=3, padding=1, groups=8), torch.nn.GELU(),
                              torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.ReLU()))  # not a pair
    net.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = net(images)
        assert fold_batch_norms(net) == 2
        got = net(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net[4][1], torch.nn.ReLU)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_training_batch_norm_is_not_folded():
    """Its output depends on the batch, which no folded convolution can reproduce."""
    net = torch.nn.Sequential(conv_bn(3, 4, kernel_size=1)).train()
    assert fold_batch_norms(net) == 0 and isinstance(net[0][1], torch.nn.BatchNorm2d)
    net.eval()
    net[0][1].train()  # only the norm is training: still not folded
    assert fold_batch_norms(net) == 0 and isinstance(net[0][1], torch.nn.BatchNorm2d)


def test_litemedsam_loads_with_its_batch_norms_folded_and_the_same_embeddings():
    """The speed-up is on by default; the per-slice baseline (build_model) keeps TinyViT as built."""
    from SAMFineTuneLib.models import build_model, load_model

    baseline = build_model("litemedsam", device="cpu")
    model = load_model("litemedsam", device="cpu", backend="torch")
    norms = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not norms and any(isinstance(m, torch.nn.BatchNorm2d) for m in baseline.image_encoder.modules())
    torch.manual_seed(0)
    images = torch.rand(1, 3, 256, 256) * 4 - 2
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(images), baseline.encode(images), atol=1e-4, rtol=1e-4)


def test_fusing_keeps_the_parameters_and_their_names():
    encoder = small_vit()
    before = {name: p.clone() for name, p in encoder.state_dict().items()}
    fuse_attention(encoder)
    after = encoder.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fused_decoder_attention_gives_segment_anythings_masks_and_trains(litemedsam):
    """Every model's decoder is built fused; switched back to segment-anything's attention, the
    same weights give the same masks and IoU, and gradients (LoRA trains through it) agree."""
    fused = litemedsam.mask_decoder
    assert sum(type(m) is FusedDecoderAttention for m in fused.modules()) == 7  # 2 blocks x 3, and the final
    plain = copy.deepcopy(fused)
    for module in plain.modules():
        if type(module) is FusedDecoderAttention:
            module.__class__ = DecoderAttention
    torch.manual_seed(0)
    embeddings = torch.randn(2, 256, 64, 64)
    boxes = torch.tensor([[[10.0, 20.0, 120.0, 140.0]], [[50.0, 50.0, 200.0, 230.0]]])
    sparse, dense = litemedsam.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = litemedsam.prompt_encoder.get_dense_pe()
    outputs = []
    for decoder in (plain, fused):
        decoder = copy.deepcopy(decoder).requires_grad_(True)
        masks, iou = decoder(embeddings[:1], pe, sparse[:1], dense[:1], multimask_output=True)
        (masks.mean() + iou.sum()).backward()
        grad = decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.grad
        outputs.append((masks.detach(), iou.detach(), grad))
    (m0, i0, g0), (m1, i1, g1) = outputs
    torch.testing.assert_close(m1, m0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(i1, i0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-3)
    assert g0.abs().sum() > 0


def test_batches_are_padded_with_blank_images_up_to_the_compiled_size():
    images = torch.rand(3, 3, 8, 8)
    padded = pad_batch(images, 8)
    assert padded.shape == (8, 3, 8, 8)
    assert torch.equal(padded[:3], images) and not padded[3:].any()
    assert pad_batch(images, 2) is images


def test_compiling_without_a_cpp_compiler_on_a_cpu_is_a_clear_error(monkeypatch):
    from SAMFineTuneLib import acceleration
    from SAMFineTuneLib.models import build_model
    from SAMFineTuneLib.segmenter import Segmenter

    model = build_model("litemedsam", device="cpu", pretrained=False)
    monkeypatch.setattr(acceleration, "cpp_compiler", lambda: "")
    with pytest.raises(ValueError, match="needs a C.. compiler"):
        Segmenter(model, compile=True)
    assert model.compiled_batch is None


@pytest.mark.slow
@pytest.mark.skipif(not cpp_compiler(), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_cpu_encoder_gives_the_eager_output():
    """Inductor's weight freezing (pre-packed weights, fused element-wise work) must not change the result."""
    from SAMFineTuneLib.models import build_model

    model = build_model("litemedsam", device="cpu", pretrained=False)
    model.image_encoder = small_vit()
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        expected = model.encode(images)
        model.compile_encoder(2)
        got = model.encode(images)  # a batch of 2 and a padded one of 1
    assert model.compiled_batch == 2 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_bf16_cpu_encoder_keeps_litemedsams_embeddings():
    """Asked for, on any CPU: where bf16 is not native it is only slower (and says so)."""
    from SAMFineTuneLib.models import load_model

    reference = load_model("litemedsam", device="cpu", backend="torch")
    model = load_model("litemedsam", device="cpu", precision="bf16", backend="torch")
    torch.manual_seed(0)
    images = torch.rand(1, 3, 256, 256) * 4 - 2  # the normalised range of a windowed slice
    with torch.inference_mode():
        expected, got = reference.encode(images), model.encode(images)
    assert model.precision == "bf16" and model.image_encoder.patch_embed.seq[0].weight.dtype == torch.bfloat16
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Stored per slice in the cache: a channels-last copy slowed every re-prompt by 4 ms per slice.
    assert got.is_contiguous()
    cosine = F.cosine_similarity(got.flatten(1), expected.flatten(1)).item()
    assert cosine > 0.999, cosine
    assert model.mask_decoder.iou_token.weight.dtype == torch.float32  # the decoder stays float32


def test_a_cpu_model_is_float32_unless_asked_and_a_bad_precision_is_named():
    from SAMFineTuneLib.models import load_model

    model = load_model("litemedsam", device="cpu", pretrained=False, backend="torch")
    assert model.precision == "float32" and not model.channels_last
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose one of: auto, float32, bf16"):
        load_model("litemedsam", device="cpu", pretrained=False, precision="fp8")


def test_precision_for_an_already_loaded_model_is_refused_and_the_model_left_as_it_was():
    from SAMFineTuneLib.models import load_model
    from SAMFineTuneLib.segmenter import Segmenter

    model = load_model("litemedsam", device="cpu", pretrained=False, backend="torch")
    with pytest.raises(ValueError, match="precision 'bf16' applies to a model given by name"):
        Segmenter(model, precision="bf16")
    with pytest.raises(ValueError, match="window_margin must be"):
        Segmenter(model, compile=True, window_margin=-1)
    assert model.compiled_batch is None and model.precision == "float32"
