"""`python -m fastgicn.models`: counts checked against arithmetic done by hand."""
import torch
from torch import nn

from fastgicn.models.summary import PAPER_TABLE1, format_summary, gicn_vs_conv_rows, gmacs, model_rows


def test_gmacs_counts_a_convolution_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.device("meta"):
        model = model.to("meta")
    assert gmacs(model, side=64) * 1e9 == 64 * 64 * (3 * 8 * 9 + 8 * 2)


def test_table3_rows_are_the_four_gicns_and_kxk_convs():
    k7 = next(r for r in gicn_vs_conv_rows() if r["k"] == 7)
    c_ins = (256, 512, 1024, 2048)
    assert k7["gicn_k"] * 1e3 == sum(2 * (c * 32 * 7 + 32) + 2 * (32 * 32 * 7 + 32) for c in c_ins)
    assert k7["conv_k"] * 1e3 == sum(c * 32 * 49 + 32 for c in c_ins)
    assert (k7["paper_gicn_k"], k7["paper_conv_k"]) == (832, 1990)


def test_model_rows_cover_every_model_with_the_papers_figures():
    rows = {r["model"]: r for r in model_rows()}
    assert set(PAPER_TABLE1) <= set(rows)
    full = rows["resnet50_gicn_gpp"]
    assert full["paper_test_ms_m40"] == 102 and full["paper_params_k"] == 3176
    # The GPP branch adds work on top of the GICN-only ablation, which shares its backbone.
    assert full["gmacs_per_patch"] > rows["resnet50_gicn"]["gmacs_per_patch"] > 100
    assert "Table 3" in format_summary()
