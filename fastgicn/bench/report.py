"""The issue's goals, judged where they apply, and the table on the terminal."""
from __future__ import annotations

import torch

# The goals for one H100, full model at 512 x 512, fp16.
GOALS = {"patches_per_s": 1500.0, "latency_p50_ms": 3.0, "end_to_end_ratio": 0.90,
         "compiled_over_default": 1.3}


def goals(result: dict, device: torch.device) -> dict:
    """The issue's H100 goals, judged only where they apply (full model, 512, fp16, an H100)."""
    name = result["machine"].get("device_name") or ""
    model = result["model"]
    applies = device.type == "cuda" and "H100" in name and model["kwargs"].get("width", 1.0) == 1.0 \
        and model["tile"] == 512
    out = {"applies": applies, "targets": GOALS}
    if not applies:
        out["why_not"] = ("not an H100 with the full model at 512 x 512" if device.type == "cuda" else
                          "CPU run: the goals are for one H100 GPU")
        return out
    fp16 = [r for r in result["results"] if r["status"] == "ok" and r["precision"] == "fp16"
            and r["backend"] != "torch.compile(default)"]
    if fp16:
        best = max(fp16, key=lambda r: r["patches_per_s"])
        fastest_latency = min(r["latency_ms"]["p50"] for r in fp16)
        out["patches_per_s"] = {"value": best["patches_per_s"], "backend": best["backend"],
                                "met": best["patches_per_s"] >= GOALS["patches_per_s"]}
        out["latency_p50_ms"] = {"value": fastest_latency, "met": fastest_latency <= GOALS["latency_p50_ms"]}
    comp = [r for r in result["results"]
            if r.get("speedup_over_compile_default") and r["precision"] == "fp16"]
    if comp:
        v = comp[0]["speedup_over_compile_default"]
        out["compiled_over_default"] = {"value": v, "met": v >= GOALS["compiled_over_default"]}
    e2e = result.get("end_to_end", {})
    if e2e.get("ratio_to_model_only"):
        out["end_to_end_ratio"] = {"value": e2e["ratio_to_model_only"],
                                   "met": e2e["ratio_to_model_only"] >= GOALS["end_to_end_ratio"]}
    return out


# -- output --------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.1f}", none="-"):
    return none if v is None else fmt.format(v)


def format_table(result: dict) -> str:
    m = result["machine"]
    model = result["model"]
    lines = [f"fastgicn bench on {m['device_name']} ({m['device']})"
             f"{' - CPU RUN' if m['is_cpu_run'] else ''}; "
             f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime'] or '-'}, "
             f"tensorrt {m['versions']['tensorrt'] or '-'}; load average "
             f"{', '.join(f'{v:.1f}' for v in m['load_average'] or [])}",
             f"model {model['name']} {model['kwargs']} at {model['tile']} x {model['tile']}: "
             f"{model['gflop_per_patch']:.2f} GFLOP per patch", ""]
    head = (f"{'backend':<24}{'prec':>5}{'build s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'best b':>7}"
            f"{'patch/s':>10}{'TFLOP/s':>9}{'% peak':>8}{'rel err':>9}{'host MB':>9}{'dev MB':>8}")
    lines += [head, "-" * len(head)]
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<24}{r['precision']:>5}  {r['status']}: {r['reason'][:150]}")
            continue
        lat = r["latency_ms"]
        frac = r["fraction_of_peak"]
        lines.append(f"{r['backend']:<24}{r['precision']:>5}{r['build_s']:>9.1f}{lat['p50']:>9.2f}{lat['p95']:>9.2f}"
                     f"{lat['p99']:>9.2f}{r['best_batch']:>7}{r['patches_per_s']:>10.1f}"
                     f"{_f(r['tflops'], '{:.3f}'):>9}"
                     f"{_f(None if frac is None else 100 * frac, '{:.1f}', 'unknown'):>8}"
                     f"{r['rel_err_vs_torch_fp32']:>9.1e}{_f(r.get('host_peak_rss_mb'), '{:.0f}'):>9}"
                     f"{_f(r.get('device_peak_allocated_mb'), '{:.0f}'):>8}")
    lines.append("")
    for r in result["results"]:
        if r["status"] == "ok":
            tp = ", ".join(f"b{t['batch']}: {t['patches_per_s']:.1f}" for t in r["throughput"])
            extra = (f"; {r['speedup_over_compile_default']:.2f}x torch.compile(default)"
                     if r.get("speedup_over_compile_default") else "")
            lines.append(f"{r['backend']} {r['precision']}: patches/s by batch {tp}{extra}")
            lines.append(f"    {r['description']}")
    s = result.get("streaming")
    if s:
        st = ", ".join(f"{k} {v:.2f} s" for k, v in s["seconds_per_stage"].items())
        lines += ["", f"streaming ({s['backend']} {s['precision']}, {s['tiles']} tiles, overlap "
                      f"{s['overlap']}): {s['tiles_per_s']:.1f} tiles/s = "
                      f"{_f(s['ratio_to_model_only'], '{:.2f}')} x model-only; {st}"]
    e = result.get("end_to_end")
    if e:
        if e.get("available"):
            st = ", ".join(f"{k} {_f(v, '{:.2f}')} s" for k, v in e["seconds_per_stage"].items())
            lines += [f"end to end ({e['backend']} {e['precision']}, {e['slide']}, {e['tiles_read']} tiles): "
                      f"{_f(e['tiles_per_s'])} tiles/s = {_f(e['ratio_to_model_only'], '{:.2f}')} x "
                      f"model-only "
                      f"at batch {e['batch']}", f"    {st}"]
        else:
            lines.append(f"end to end: not run ({e['reason']})")
    h = result.get("host_ceiling")
    if h:
        lines += format_host_ceiling(h)
    g = result.get("goals", {})
    if g.get("applies"):
        for key in ("patches_per_s", "latency_p50_ms", "end_to_end_ratio", "compiled_over_default"):
            if key in g:
                lines.append(f"goal {key}: {g[key]['value']:.2f} vs {GOALS[key]} -> "
                             f"{'met' if g[key]['met'] else 'NOT met'}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_host_ceiling(h: dict) -> list[str]:
    if "layouts" not in h:
        return [f"host ceiling: not run ({h.get('reason')})"]
    lines = []
    for layout, r in h["layouts"].items():
        if not r.get("available"):
            lines.append(f"host ceiling ({layout}): not run ({r.get('reason')})")
            continue
        rd = r.get("read") or {}
        st = r["seconds_per_stage_median"]
        top = sorted(((k, v) for k, v in st.items() if v and k not in ("total", "segment_loop")),
                     key=lambda kv: -kv[1])[:5]
        lines += [f"host ceiling ({layout} layout, level {rd.get('level')} reduced {rd.get('reduction')}x, "
                  f"reader {r['slide']['reader']}, {r['candidate_tiles']} tiles of "
                  f"{r['config']['tile_size']} at "
                  f"{r['config']['target_mpp']} um/px, {r['threads']} reader threads): whole flow "
                  f"{_f(r['flow_tiles_per_s'])} tiles/s vs raw decode "
                  f"{_f(r['decode_tiles_per_s'])} tiles/s = "
                  f"{_f(r['ratio'], '{:.2f}')} (goal >= {r['goal']}; segment loop alone "
                  f"{_f(r['ratio_loop'], '{:.2f}')})",
                  "    seconds per stage: " + ", ".join(f"{k} {v:.2f}" for k, v in top) +
                  f"; total {_f(st.get('total'), '{:.2f}')}"]
    return lines

