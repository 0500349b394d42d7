"""Parameters and GMACs of every registered model beside the paper's Table 1 and Table 3 figures."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbone import EXPANSION, RESNET50_STAGES
from .registry import create_model, list_models

# Table 1 (Camelyon16): parameters (thousands, the paper's count, which leaves the ResNet50 backbone out) and
# test time per 512 x 512 patch on an NVIDIA M40.
PAPER_TABLE1 = {
    "resnet50_gicn": {"params_k": 832, "test_ms": 69, "dice": 59.18},
    "resnet50_gpp": {"params_k": 2619, "test_ms": 77, "dice": 61.33},
    "resnet50_gicn_gpp": {"params_k": 3176, "test_ms": 102, "dice": 63.70},
}
# Table 3: parameters (thousands) of ResNet50-GICN and of the same model with k x k convolutions instead.
PAPER_TABLE3 = {3: (358, 614), 5: (595, 1302), 7: (832, 1990), 9: (1069, 2678), 11: (1306, 3366)}
GICN_CHANNELS = 32


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gmacs(model: torch.nn.Module, side: int = 512) -> float:
    """Multiply-accumulates of one forward pass on a side x side patch, counted on the meta device."""
    x = torch.empty(1, 3, side, side, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2e9


def model_rows(side: int = 512) -> list[dict]:
    rows = []
    for name in list_models():
        with torch.device("meta"):
            model = create_model(name).eval()
        total = count_params(model)
        backbone = getattr(model, "backbone", None)  # models registered by users may have none
        beyond_backbone = total - count_params(backbone) if backbone is not None else float("nan")
        paper = PAPER_TABLE1.get(name, {})
        rows.append({"model": name, "params_m": total / 1e6, "params_beyond_backbone_k": beyond_backbone / 1e3,
                     "paper_params_k": paper.get("params_k"), "gmacs_per_patch": gmacs(model, side),
                     "paper_test_ms_m40": paper.get("test_ms"), "paper_dice": paper.get("dice")})
    return rows


def gicn_vs_conv_rows() -> list[dict]:
    """Table 3: the four GICNs of ResNet50-GICN against k x k convolutions with the same inputs and outputs."""
    channels = [planes * EXPANSION for _, planes, _, _ in RESNET50_STAGES]
    rows = []
    for k, (paper_gicn, paper_conv) in PAPER_TABLE3.items():
        c = GICN_CHANNELS
        gicn = sum(2 * (c_in * c * k + c) + 2 * (c * c * k + c) for c_in in channels)
        conv = sum(c_in * c * k * k + c for c_in in channels)
        rows.append({"k": k, "gicn_k": gicn / 1e3, "paper_gicn_k": paper_gicn,
                     "conv_k": conv / 1e3, "paper_conv_k": paper_conv})
    return rows


def _ratio(ours, theirs) -> str:
    return f"{ours / theirs:6.2f}x" if theirs else "      -"


def format_summary(side: int = 512) -> str:
    lines = [f"Models at a {side} x {side} patch (paper figures from Table 1; the paper's parameter counts leave",
             "the ResNet50 backbone out, so ours are shown both in total and beyond the backbone)", ""]
    lines.append(f"{'model':<20}{'params':>10}{'beyond bb':>12}{'paper':>9}{'ratio':>9}{'GMACs':>9}"
                 f"{'paper ms (M40)':>16}")
    for r in model_rows(side):
        paper_k = r["paper_params_k"]
        lines.append(f"{r['model']:<20}{r['params_m']:>9.2f}M{r['params_beyond_backbone_k']:>11.0f}K"
                     f"{(str(paper_k) + 'K') if paper_k else '-':>9}{_ratio(r['params_beyond_backbone_k'], paper_k):>9}"
                     f"{r['gmacs_per_patch']:>9.1f}{r['paper_test_ms_m40'] or '-':>16}")
    lines += ["", "Table 3: the four GICNs (32 channels) against k x k convolutions in their place",
              f"{'k':>3}{'GICN':>10}{'paper':>9}{'ratio':>9}{'k x k conv':>12}{'paper':>9}{'ratio':>9}"]
    for r in gicn_vs_conv_rows():
        lines.append(f"{r['k']:>3}{r['gicn_k']:>9.0f}K{r['paper_gicn_k']:>8}K{_ratio(r['gicn_k'], r['paper_gicn_k']):>9}"
                     f"{r['conv_k']:>11.0f}K{r['paper_conv_k']:>8}K{_ratio(r['conv_k'], r['paper_conv_k']):>9}")
    return "\n".join(lines)
