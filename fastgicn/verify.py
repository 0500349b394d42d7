"""`python -m fastgicn.verify`: prove the fast kernels (and a whole model) match the reference on this machine.

    python -m fastgicn.verify                        # kernel table + whole model, Triton vs reference modules
    python -m fastgicn.verify --save ref.npz         # on a trusted machine: store a model's reference outputs
    python -m fastgicn.verify --reference ref.npz    # on a deployment machine: check against those outputs

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before they are
imported) at small shapes; on a GPU the table uses the paper's shapes (Res-2..5 at a 512 x 512 input).
Each row: kernel, shape, dtype, layout, max |error|, max relative error (max |error| / max |reference|), the
tolerance on that relative error, and PASS / FAIL. Exit status: 0 all passed, 1 a check failed, 2 the checks
could not run (bad arguments, unreadable file, missing dependency).

The `.npz` written by --save is self-contained: model name and kwargs, seed, the weights, the input and the
reference (float32, TF32 off) logits, plus the versions and device that made it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, FastGicnError

# Relative tolerances on max|err| / max|ref|. Kernel rows compare one op with fp32 accumulation against the
# reference in fp32 on the same rounded inputs; model rows go through ~60 layers, so they get more room.
KERNEL_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
MODEL_TOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
NPZ_FORMAT = 1


@dataclass
class Row:
    kernel: str
    shape: str
    dtype: str
    layout: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tol: float = float("nan")
    ok: bool = False
    note: str = ""

    @property
    def result(self) -> str:
        return "PASS" if self.ok else ("FAIL" if not self.note else f"FAIL ({self.note})")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        head = ("kernel", "shape", "dtype", "layout", "max abs err", "max rel err", "tolerance", "result")
        body = [(r.kernel, r.shape, r.dtype, r.layout, f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.tol:.1e}",
                 r.result) for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def compare(name, shape, dtype, layout, out, ref, tol) -> Row:
    """One row: out against ref (both tensors), relative to the reference's largest magnitude."""
    import torch

    row = Row(name, shape, dtype, layout, tol=tol)
    if tuple(out.shape) != tuple(ref.shape):
        row.note = f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        return row
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        row.note = "non-finite output"
        return row
    row.max_abs = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    row.max_rel = row.max_abs / scale if scale > 0 else row.max_abs
    row.ok = row.max_rel <= tol
    return row


def _dtype(name):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _randomise(module, seed):
    """Non-trivial biases and BatchNorm statistics, so a dropped bias or a mis-folded BN shows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def kernel_cases(device: str, dtypes: list[str]) -> list[tuple]:
    """(op, n, c_in, h, w, k_or_cout, c_out, dtype, channels_last). Paper shapes on a GPU, small ones on CPU."""
    cases = []
    if device == "cuda":
        for dt in dtypes:
            for c_in, side, stage in ((256, 128, "res2"), (512, 64, "res3"), (1024, 64, "res4"),
                                      (2048, 64, "res5")):
                for cl in (True, False):
                    cases.append(("gicn", 2, c_in, side, side, 7, 32, dt, cl))
            cases.append(("gicn", 1, 2048, 64, 64, 15, 32, dt, True))
            for cl in (True, False):
                cases.append(("gpp", 2, 2048, 64, 64, None, 512, dt, cl))
    else:
        for dt in dtypes:
            cases += [("gicn", 2, 5, 13, 21, 7, 32, dt, False), ("gicn", 1, 6, 13, 21, 7, 32, dt, True),
                      ("gpp", 2, 6, 13, 21, None, 8, dt, False), ("gpp", 1, 10, 12, 12, None, 16, dt, True)]
        if "float32" in dtypes:
            cases += [("gicn", 1, 3, 8, 9, 1, 32, "float32", False), ("gicn", 1, 3, 9, 12, 15, 8, "float32", True)]
    return cases


def run_kernel_case(case, device: str, seed: int = 0, tol: dict | None = None) -> Row:
    import torch

    from . import kernels
    from .models.gicn import GICN
    from .models.gpp import GPP

    op, n, c_in, h, w, k, c_out, dt, cl = case
    dtype = _dtype(dt)
    tol = (tol or KERNEL_TOL)[dt]
    torch.manual_seed(seed)
    module = GICN(c_in, c_out, k) if op == "gicn" else GPP(c_in, c_out)
    module = _randomise(module, seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(n, c_in, h, w, generator=g) + (0.3 if op == "gpp" else 0.0)).to(device, dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    shape = f"{n}x{c_in}x{h}x{w}" + (f" k={k}" if op == "gicn" else "") + f" -> {c_out}"
    layout = "channels_last" if cl else "nchw"
    with torch.inference_mode():
        ref = copy.deepcopy(module).to(device).float()(x.float())
        module = module.to(device, dtype)
        try:
            out = kernels.gicn_forward(x, module) if op == "gicn" else kernels.gpp_forward(x, module)
        except FastGicnError as e:
            return Row(op, shape, dt, layout, tol=tol, note=f"{type(e).__name__}: {e}")
    return compare(op, shape, dt, layout, out, ref, tol)


# --- whole model -----------------------------------------------------------------------------------------------

def make_model(name: str, kwargs: dict, seed: int):
    """The model the checks run: created with a fixed seed, eval mode, random (but fixed) BN statistics."""
    import torch

    from .models import create_model

    torch.manual_seed(seed)
    return _randomise(create_model(name, **kwargs), seed).eval()


def make_input(batch: int, size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed + 12345)
    return torch.randn(batch, 3, size, size, generator=g)


def model_forward(model, x, backend: str, device: str, dtype: str):
    """Logits (float32, CPU) of `model` on `x` with the given backend: 'torch' (reference) or 'triton'."""
    import torch

    from . import kernels

    m = copy.deepcopy(model).to(device, _dtype(dtype))
    if backend == "triton":
        kernels.use_triton(m)
    elif backend != "torch":
        raise ConfigError(f"backend {backend!r}: use 'torch' or 'triton'")
    with torch.inference_mode():
        return m(x.to(device, _dtype(dtype))).float().cpu()


def save_reference(path: Path, name: str, kwargs: dict, seed: int, batch: int, size: int) -> Path:
    """Run the reference model in float32 (TF32 off) and store everything a later check needs."""
    import numpy as np
    import torch

    model = make_model(name, kwargs, seed)
    x = make_input(batch, size, seed)
    with _no_tf32():
        logits = model_forward(model, x, "torch", "cpu", "float32")
    arrays = {f"param/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    meta = dict(format=NPZ_FORMAT, model_name=name, model_kwargs=kwargs, seed=seed, dtype="float32",
                device="cpu", torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), platform=platform.platform())
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), input=x.numpy(), output=logits.numpy(), **arrays)
    return path if str(path).endswith(".npz") else Path(str(path) + ".npz")


def load_reference(path: Path):
    """(meta, model with the stored weights, input, reference logits) from a --save file."""
    import numpy as np
    import torch

    if not Path(path).is_file():
        raise ConfigError(f"reference file {path} does not exist: write one with "
                          "`python -m fastgicn.verify --save FILE.npz` on a trusted machine")
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        x, out = torch.from_numpy(data["input"]), torch.from_numpy(data["output"])
        state = {k[len("param/"):]: torch.from_numpy(data[k]) for k in data.files if k.startswith("param/")}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"reference file {path} is not a fastgicn.verify --save file ({e}); write a new one") \
            from None
    if meta.get("format") != NPZ_FORMAT:
        raise ConfigError(f"reference file {path} has format {meta.get('format')}, this version reads "
                          f"{NPZ_FORMAT}: write it again with this version's --save")
    from .models import create_model

    model = create_model(meta["model_name"], **meta["model_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"reference file {path}: its weights do not fit model {meta['model_name']} "
                          f"{meta['model_kwargs']} here ({str(e).splitlines()[0]})") from None
    return meta, model.eval(), x, out


class _no_tf32:
    """True float32 convolutions and matmuls on a GPU for the duration (the reference outputs are float32)."""

    def __enter__(self):
        import torch

        self.old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        import torch

        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.old


# --- command line ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastgicn.verify", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: cuda if available; cpu runs the kernels under the Triton interpreter)")
    p.add_argument("--dtype", nargs="+", choices=("float32", "float16", "bfloat16"), default=None,
                   help="dtypes of the kernel table (default: float32 float16, plus bfloat16 on a GPU)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model check")
    p.add_argument("--model", default="resnet50_gicn_gpp", help="registered model name")
    p.add_argument("--k", type=int, default=7, help="GICN kernel size of the model")
    p.add_argument("--width", type=float, default=None,
                   help="channel width of the model (default 0.125 on CPU, 1.0 on a GPU)")
    p.add_argument("--size", type=int, default=None, help="input side (default 64 on CPU, 512 on a GPU)")
    p.add_argument("--batch", type=int, default=2, help="model input batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", type=Path, metavar="FILE.npz",
                   help="write the reference model's outputs (and weights, input) to FILE.npz")
    p.add_argument("--reference", type=Path, metavar="FILE.npz",
                   help="check this machine's backends against outputs stored by --save")
    p.add_argument("--backend", nargs="+", choices=("torch", "triton"), default=["torch", "triton"],
                   help="backends checked against a --reference file (default: both)")
    p.add_argument("--tol", type=float, default=None, help="override every relative tolerance")
    return p.parse_args(argv)


def _prepare_triton(device: str):
    """Import fastgicn.kernels for `device`; (module, None) or (None, why not)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels are decorated, i.e. imported
    try:
        from . import kernels
    except ImportError as e:
        return None, f"Triton unavailable ({e})"
    if device == "cpu" and not kernels.INTERPRETED:
        return None, ("fastgicn.kernels was imported before TRITON_INTERPRET=1 was set, so it cannot run on CPU; "
                      "run `TRITON_INTERPRET=1 python -m fastgicn.verify` or use a GPU")
    return kernels, None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except FastGicnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to PyTorch here; use --device cpu")
    dtypes = args.dtype or (["float32", "float16", "bfloat16"] if device == "cuda" else ["float32", "float16"])
    if device == "cpu" and "bfloat16" in dtypes:
        raise ConfigError("--dtype bfloat16 needs a GPU: the Triton interpreter has no bfloat16")
    kernel_tol = {d: args.tol or t for d, t in KERNEL_TOL.items()}
    model_tol = {d: args.tol or t for d, t in MODEL_TOL.items()}
    width = args.width if args.width is not None else (1.0 if device == "cuda" else 0.125)
    size = args.size if args.size is not None else (512 if device == "cuda" else 64)
    kwargs = {"width": width} if args.model == "resnet50_gpp" else {"k": args.k, "width": width}

    kernels, why = _prepare_triton(device)
    if device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU ({platform.processor() or platform.machine()})"
        where += ", Triton interpreter" if kernels is not None else ""
    print(f"fastgicn.verify on {where}; torch {torch.__version__}" + (f"; {why}" if why else ""))

    if args.save is not None:
        path = save_reference(args.save, args.model, kwargs, args.seed, args.batch, size)
        print(f"saved reference outputs of {args.model} {kwargs} (input {args.batch}x3x{size}x{size}, seed "
              f"{args.seed}, float32 on CPU) to {path}")
        return 0

    if args.reference is None and args.no_kernels and args.no_model:
        raise ConfigError("--no-kernels and --no-model leave nothing to check")
    report = Report()
    with _no_tf32():
        if args.reference is not None:
            meta, model, x, expected = load_reference(args.reference)
            shape = "x".join(map(str, x.shape))
            print(f"reference {args.reference}: {meta['model_name']} {meta['model_kwargs']}, made with torch "
                  f"{meta['torch']} on {meta['platform']}")
            if "triton" in args.backend and kernels is None:
                raise ConfigError(f"cannot check the triton backend: {why}; pass --backend torch")
            for backend in args.backend:
                for dt in dtypes:
                    out = model_forward(model, x, backend, device, dt)
                    report.rows.append(compare(f"model[{backend}] vs file", shape, dt, "nchw", out, expected,
                                               model_tol[dt]))
        else:
            if kernels is None:
                raise ConfigError(f"cannot check the kernels: {why}")
            if not args.no_kernels:
                for case in kernel_cases(device, dtypes):
                    report.rows.append(run_kernel_case(case, device, args.seed, kernel_tol))
            if not args.no_model:
                model = make_model(args.model, kwargs, args.seed)
                x = make_input(args.batch, size, args.seed)
                shape = f"{args.batch}x3x{size}x{size} width={width}"
                ref = model_forward(model, x, "torch", device, "float32")
                for dt in dtypes:
                    out = model_forward(model, x, "triton", device, dt)
                    report.rows.append(compare("model[triton] vs torch", shape, dt, "nchw", out, ref,
                                               model_tol[dt]))
    print(report.table())
    failed = sum(not r.ok for r in report.rows)
    print(f"{len(report.rows) - failed} passed, {failed} failed")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
