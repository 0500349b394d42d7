"""The reference network against hand-computed structure, NumPy references and the paper's shapes."""
import numpy as np
import pytest
import torch
from torch import nn

from fastgicn.errors import ConfigError
from fastgicn.models import GICN, GPP, create_model, list_models, pool_kernels


def numpy_conv2d(x, w, b, pad_hw):
    """Direct zero-padded cross-correlation, NumPy, for one image C x H x W."""
    c_out, c_in, kh, kw = w.shape
    ph, pw = pad_hw
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    h, wd = x.shape[1], x.shape[2]
    out = np.zeros((c_out, h, wd))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + h, j:j + wd]
            out += np.einsum("oc,chw->ohw", w[:, :, i, j], patch)
    return out + b[:, None, None]


@pytest.mark.parametrize("k,h,w", [(1, 5, 7), (3, 13, 21), (7, 9, 8)])
def test_gicn_matches_numpy_two_branch_reference(k, h, w):
    torch.manual_seed(0)
    module = GICN(5, 4, k).double().eval()
    x = torch.randn(1, 5, h, w, dtype=torch.float64)
    p = {n: t.detach().numpy() for n, t in module.state_dict().items()}
    xn = x[0].numpy()
    a = numpy_conv2d(numpy_conv2d(xn, p["a_row.weight"], p["a_row.bias"], (0, k // 2)),
                     p["a_col.weight"], p["a_col.bias"], (k // 2, 0))
    b = numpy_conv2d(numpy_conv2d(xn, p["b_col.weight"], p["b_col.bias"], (k // 2, 0)),
                     p["b_row.weight"], p["b_row.bias"], (0, k // 2))
    np.testing.assert_allclose(module(x)[0].detach().numpy(), a + b, rtol=1e-10, atol=1e-10)


def test_gicn_parameter_count_is_hand_computed():
    c_in, c_out, k = 2048, 32, 7
    expected = 2 * (c_in * c_out * k + c_out) + 2 * (c_out * c_out * k + c_out)
    assert sum(p.numel() for p in GICN(c_in, c_out, k).parameters()) == expected


@pytest.mark.parametrize("k", [0, 2, 16, 7.0])
def test_gicn_rejects_unusable_kernel_sizes(k):
    with pytest.raises(ConfigError, match="odd integer"):
        GICN(4, 4, k)


def test_gpp_pool_kernels_are_the_papers_on_a_64_map():
    assert pool_kernels(64) == (10, 20, 30, 60)
    # 64 // k bins per side: 6, 3, 2, 1 as in section 3.1.3
    assert [64 // k for k in pool_kernels(64)] == [6, 3, 2, 1]
    with pytest.raises(ConfigError, match="at least 6"):
        pool_kernels(5)


def numpy_bilinear_half_pixel(img, out_h, out_w):
    """Bilinear resize with half-pixel centres (align_corners=False), edge-clamped, for C x h x w."""
    c, h, w = img.shape

    def axis(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(out_h, h)
    x0, x1, fx = axis(out_w, w)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bot = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def test_gpp_branches_are_block_means_upsampled():
    """With identity 1x1 convs and identity BN, each branch is the block mean of Res-5, bilinearly upsampled."""
    c, side = 3, 64
    gpp = GPP(c, c).double().eval()
    for branch in gpp.branches:
        conv, bn = branch[0], branch[1]
        conv.weight.data = torch.eye(c, dtype=torch.float64)[:, :, None, None]
        bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps), bn.weight.data.fill_(1), bn.bias.data.zero_()
    x = torch.rand(1, c, side, side, dtype=torch.float64)  # positive, so the ReLU is the identity
    out = gpp(x)[0].detach().numpy()
    assert out.shape == (5 * c, side, side)
    np.testing.assert_array_equal(out[:c], x[0].numpy())
    xn = x[0].numpy()
    for level, kernel in enumerate((10, 20, 30, 60)):
        bins = side // kernel
        blocks = xn[:, :bins * kernel, :bins * kernel].reshape(c, bins, kernel, bins, kernel).mean(axis=(2, 4))
        expected = numpy_bilinear_half_pixel(blocks, side, side)
        got = out[c * (level + 1):c * (level + 2)]
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_registry_lists_the_paper_model_and_its_ablations():
    assert {"resnet50_gicn_gpp", "resnet50_gicn", "resnet50_gpp"} <= set(list_models())
    with pytest.raises(ConfigError, match="resnet50_gicn_gpp"):
        create_model("resnet51")
    with pytest.raises(ConfigError, match="takes no argument"):
        create_model("resnet50_gpp", k=7)


def test_backbone_is_resnet50_with_a_strided_conv_instead_of_max_pool():
    model = create_model("resnet50_gicn_gpp")
    backbone = model.backbone
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(s) for s in (backbone.res2, backbone.res3, backbone.res4, backbone.res5)] == [3, 4, 6, 3]
    assert backbone.stem[1][0].stride == (2, 2) and backbone.stem[1][0].kernel_size == (3, 3)
    assert all(b.conv2.dilation == (2, 2) for b in backbone.res4)
    assert all(b.conv2.dilation == (4, 4) for b in backbone.res5)
    # torchvision's resnet50 has 25,557,032 parameters; less its 2048x1000 fc (2,049,000), plus our 64->64
    # 3x3 stem conv (36,864) and its BN (128).
    assert sum(p.numel() for p in backbone.parameters()) == 25_557_032 - 2_049_000 + 36_864 + 128


def test_full_model_shapes_at_the_papers_512_input():
    model = create_model("resnet50_gicn_gpp").eval()
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        res = model.backbone(x)
        assert [tuple(r.shape[1:]) for r in res] == [(256, 128, 128), (512, 64, 64), (1024, 64, 64),
                                                      (2048, 64, 64)]
        assert model.gpp_branch.gpp(res[3]).shape[1] == 4096
        assert model.decoder(*res).shape == (1, 32, 512, 512)
        assert model.gpp_branch(res[3]).shape == (1, 64, 512, 512)


@pytest.mark.parametrize("name", ["resnet50_gicn_gpp", "resnet50_gicn", "resnet50_gpp"])
@pytest.mark.parametrize("hw", [(64, 64), (96, 160)])
def test_small_models_give_logits_of_the_input_size(name, hw):
    model = create_model(name, width=0.125).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        assert model(x).shape == (2, 2, *hw)
    assert (model.decoder is None) == (name == "resnet50_gpp")
    assert (model.gpp_branch is None) == (name == "resnet50_gicn")


def test_width_scales_every_layer_and_head_sees_both_branches():
    model = create_model("resnet50_gicn_gpp", width=0.25)
    assert model.backbone.out_channels == [64, 128, 256, 512]
    assert model.decoder.out_channels == 8 and model.gpp_branch.out_channels == 16
    assert model.head.in_channels == 24 and model.head.out_channels == 2


def test_inputs_the_network_cannot_take_raise_config_errors():
    model = create_model("resnet50_gicn_gpp", width=0.125).eval()
    with pytest.raises(ConfigError, match="multiples of 8"):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ConfigError, match="at least 48"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ConfigError, match="N x 3"):
        model(torch.randn(1, 4, 64, 64))



def test_decoder_wires_each_gicn_to_its_level_and_the_head_reads_decoder_then_gpp():
    """GICN-1 sees Res-2, GICN-2..4 see Res-3..5 (paper 3.1.2); the head's first inputs are the decoder's."""
    torch.manual_seed(0)
    model = create_model("resnet50_gicn_gpp", width=0.125).eval()
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    for name in ("gicn1", "gicn2", "gicn3", "gicn4"):
        getattr(model.decoder, name).register_forward_hook(lambda m, inp, out, name=name: seen.update({name: inp[0]}))
    with torch.no_grad():
        res = model.backbone(x)
        logits = model(x)
        for name, level in zip(("gicn1", "gicn2", "gicn3", "gicn4"), res):
            assert torch.equal(seen[name], level), name
        # Rebuild the head by hand from the two branches, decoder channels first.
        dec, gpp = model.decoder(*res), model.gpp_branch(res[3])
        w, b = model.head.weight[:, :, 0, 0], model.head.bias
        by_hand = torch.einsum("oc,nchw->nohw", w, torch.cat([dec, gpp], 1)) + b[None, :, None, None]
        assert torch.allclose(logits, by_hand, atol=1e-5)
