"""Images/s and model-FLOPs utilisation (MFU) from bench.train_step JSON lines (bench/gpu.sh).

FLOPs per example (one pair = two views through the encoder), ResNet-50 at 224 px:
  forward   = 4.1 G multiply-adds = 8.2 GFLOPs per image (2 FLOPs per multiply-add, the
              convention of the peak figures below; the TF profiler counts 8.20 GFLOPs on our
              encoder graph). The "4.1 GFLOPs" often quoted for ResNet-50 is the MAC count.
  training  = 3 x forward (backward ~ 2 x forward)
  per pair  = 2 views x 3 x 8.2 = 49.2 GFLOPs     (projection head, loss, LARS: < 1%, ignored)
MFU = pairs/s x 49.2 GFLOPs / peak. The MFU under the "4.1 GFLOPs" convention (half of it) is
printed too so the two conventions can be compared. Peaks (dense, no sparsity) are looked up
from `nvidia-smi --query-gpu=name`; override with BENCH_PEAK_TFLOPS_BF16 / _FP32 / _TF32.

fp32 note: TensorFlow runs fp32 convolutions/matmuls on Ampere+ as TF32 on tensor cores by
default, so fp32 MFU is printed against both the non-tensor-core fp32 peak and the TF32 peak.

  python -m bench.gpu_report --jsonl=bench_gpu.jsonl
"""
import argparse
import json
import os
import sys

# name substring -> dense TFLOP/s: bf16 tensor, tf32 tensor, fp32 (non-tensor-core).
PEAKS = [
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]
FWD_GFLOPS = {("resnet50", 224): 8.2, ("resnet18", 224): 3.66}  # 2 x MACs per image
STATED_FWD_GFLOPS = {("resnet50", 224): 4.1}  # the issue's figure (= MACs)


def peaks_for(gpu_name):
    out = None
    for key, p in PEAKS:
        if key.lower() in (gpu_name or "").lower():
            out = dict(p)
            break
    for k in ("bf16", "fp32", "tf32"):
        env = os.environ.get(f"BENCH_PEAK_TFLOPS_{k.upper()}")
        if env:
            out = out or {}
            out[k] = float(env)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jsonl", required=True)
    ap.add_argument("--gpu_name", default=None, help="default: from the JSON lines")
    args = ap.parse_args(argv)
    rows, aug = [], []
    with open(args.jsonl) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("bench") == "train_step":
                    rows.append(rec)
                elif rec.get("bench") == "gpu_augment":
                    aug.append(rec)
    if not rows:
        print("# no train_step records in", args.jsonl)
        return 1
    c0 = rows[0].get("config", {})
    print(f"\n# {c0.get('backbone')}@{c0.get('image_size')} train step: pairs/s (encoder "
          "images/s = 2x), MFU")
    hdr = (f"{'prec':>5} {'xla':>4} {'batch':>5} {'ms/step':>8} {'pairs/s':>8} {'enc img/s':>9} "
           f"{'GFLOP/pair':>10} {'TFLOP/s':>8} {'peak':>6} {'MFU':>6} {'MFU@4.1':>7} "
           f"{'fp32 MFU vs TF32':>16} {'1st s':>6} {'GPU GB':>6}  status")
    print(hdr)
    print("-" * len(hdr))
    for rec in rows:
        c = rec.get("config", {})
        fig = rec.get("figures", {})
        gpu = args.gpu_name or ((rec.get("machine") or {}).get("gpus") or [""])[0]
        prec, xla = c.get("precision"), "on" if c.get("jit") else "off"
        if "error" in rec or "images_per_s" not in fig:
            print(f"{prec:>5} {xla:>4} {c.get('batch_size', '-'):>5} {'-':>8} {'-':>8} {'-':>9} "
                  f"{'-':>10} {'-':>8} {'-':>6} {'-':>6} {'-':>7} {'-':>16} {'-':>6} {'-':>6}  "
                  f"FAILED: {rec.get('error')}")
            continue
        key = (c.get("backbone"), c.get("image_size"))
        fwd = FWD_GFLOPS.get(key) or fig.get("forward_gflops_per_image")
        per_pair = 2 * 3 * fwd if fwd else None
        tflops = fig["images_per_s"] * per_pair / 1e3 if per_pair else None
        peaks = peaks_for(gpu)
        peak = (peaks or {}).get("bf16" if prec == "bf16" else "fp32")
        mfu = tflops / peak if (tflops and peak) else None
        stated = STATED_FWD_GFLOPS.get(key)
        mfu41 = (fig["images_per_s"] * 2 * 3 * stated / 1e3 / peak) if (stated and peak) else None
        mfu_tf32 = (tflops / peaks["tf32"]) if (prec == "fp32" and peaks and tflops) else None

        def f(v, fmt):
            return fmt.format(v) if v is not None else "-"
        print(f"{prec:>5} {xla:>4} {c['batch_size']:>5} {fig['ms_per_step']:>8.1f} "
              f"{fig['images_per_s']:>8.0f} {fig['encoder_images_per_s']:>9.0f} "
              f"{f(per_pair, '{:.1f}'):>10} {f(tflops, '{:.1f}'):>8} {f(peak, '{:.0f}'):>6} "
              f"{f(mfu, '{:.1%}'):>6} {f(mfu41, '{:.1%}'):>7} {f(mfu_tf32, '{:.1%}'):>16} "
              f"{fig.get('first_step_s', 0):>6.1f} {f(fig.get('gpu_peak_mem_gb'), '{:.1f}'):>6}"
              f"  ok")
    best = {}
    for rec in rows:
        c, fig = rec.get("config", {}), rec.get("figures", {})
        if "ms_per_step" in fig and "error" not in rec:
            key = (c.get("precision"), c.get("batch_size"))
            best[key] = min(best.get(key, float("inf")), fig["ms_per_step"])
    for rec in aug:
        c, fig = rec["config"], rec.get("figures")
        if not fig:
            err = str(rec.get("error", "")).splitlines()[0][:200]
            print(f"# device-placed photometric augmentation "
                  f"(XLA {'on' if c['jit'] else 'off'}): {err}")
            continue
        steps = {p: v for (p, b), v in best.items() if b == c["batch_size"]}
        rel = ", ".join(f"{100 * fig['ms_per_batch'] / v:.0f}% of the best {p} step "
                        f"({v:.1f} ms)" for p, v in sorted(steps.items()))
        print(f"# device-placed {c.get('preset', 'derm')} photometric ops (2 views) on "
              f"{c['device']}, batch {c['batch_size']}, XLA {'on' if c['jit'] else 'off'}: {fig['ms_per_batch']:.2f} ms/batch"
              + (f" = {rel}" if rel else ""))
    gpu = args.gpu_name or ((rows[0].get("machine") or {}).get("gpus") or ["?"])[0]
    print(f"# GPU: {gpu}; peaks (dense TFLOP/s): {peaks_for(gpu)}; FLOPs per pair = "
          "2 views x 3 (fwd+bwd) x forward; forward = 8.2 GFLOPs (ResNet-50 @224, 2 x 4.1 GMACs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
