"""Shared helpers for the benchmarks: machine/version facts, JSON lines, tables, peak RSS,
synthetic case-bag records and statistics."""
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_DATA_ROOT = os.environ.get("MICLE_BENCH_DATA", "/tmp/micle_bench_data")


# ----------------------------------------------------------------------------- facts
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpu_names():
    """GPU names from nvidia-smi (empty list when there is none or it is not installed)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []


def machine_info():
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(int(line.split()[1]) / 2 ** 20, 1)
                    break
    except OSError:
        pass
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "mem_gb": mem_gb, "gpus": gpu_names(), "hostname": platform.node()}


def versions():
    import keras
    import numpy as np
    import tensorflow as tf
    try:
        from micle_tf import __version__ as micle_version
    except ImportError:
        micle_version = None
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "python": platform.python_version(), "numpy": np.__version__,
            "micle_tf": micle_version}


def peak_rss_mb():
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# ----------------------------------------------------------------------------- output
def emit(record, jsonl_path=None):
    """Prints one JSON line (and appends it to `jsonl_path` when given)."""
    line = json.dumps(record, sort_keys=False, default=str)
    print(line, flush=True)
    if jsonl_path:
        with open(jsonl_path, "a") as f:
            f.write(line + "\n")


def table(rows, columns, title=None):
    """A plain-text table: `columns` = [(header, key or fn(row), format)]."""
    cells = []
    for row in rows:
        out = []
        for _, key, fmt in columns:
            value = key(row) if callable(key) else row.get(key)
            out.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        cells.append(out)
    headers = [c[0] for c in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def summarize(values):
    """Median, min, max and count of a list of floats (None when empty)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


# ----------------------------------------------------------------------------- synthetic data
def _synthetic_image(rng, size, fmt):
    """A smooth random colour field plus noise: compresses like a photo, not like noise."""
    import numpy as np
    from PIL import Image
    coarse = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    img = img + rng.normal(0, 6, size=img.shape)
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_records(stored_size, num_cases=400, min_images=1, max_images=6, fmt="jpeg",
                      seed=0, num_shards=4, root=DEFAULT_DATA_ROOT):
    """Writes (once, then reuses) random-image case bags with `stored_size` px images.

    Bags hold `min_images`..`max_images` images (uniform), like multi-view patient cases;
    three classes; `num_shards` shards per split so the reader's interleave has files to
    cycle. Returns the records directory (split "train" holds 70% of the cases)."""
    import numpy as np

    from data_pipelines.writer import SourceCase, SourceData, SourceImage, write_dataset
    params = {"stored_size": stored_size, "num_cases": num_cases, "min_images": min_images,
              "max_images": max_images, "fmt": fmt, "seed": seed, "num_shards": num_shards,
              "version": 1}
    out = os.path.join(root, f"synthetic_{stored_size}px_{fmt}_{num_cases}c")
    marker = os.path.join(out, "bench_params.json")
    if os.path.exists(marker) and os.path.exists(os.path.join(out, "dataset_info.json")):
        with open(marker) as f:
            if json.load(f) == params:
                return out
    rng = np.random.default_rng(seed)
    cases, n = [], 0
    for c in range(num_cases):
        k = int(rng.integers(min_images, max_images + 1))
        images = []
        for i in range(k):
            data = _synthetic_image(rng, stored_size, fmt)
            images.append(SourceImage(item=f"c{c}i{i}", load=lambda d=data: d))
            n += 1
        cases.append(SourceCase(key=f"case{c}", images=images, label=c % 3))
    source = SourceData(name=f"synthetic{stored_size}", task="multiclass",
                        label_names=["a", "b", "c"], cases=cases, items_read=n)
    t0 = time.time()
    write_dataset(source, out, salt=b"micle-bench", num_shards=num_shards, overwrite=True)
    with open(marker, "w") as f:
        json.dump(params, f)
    print(f"# wrote synthetic records {out} ({n} images) in {time.time() - t0:.1f}s",
          file=sys.stderr, flush=True)
    return out


def ph2_records(root=DEFAULT_DATA_ROOT):
    """PH2 records (32x32 dermoscopy patches, 20 per lesion), written once with micle-data."""
    out = os.path.join(root, "ph2")
    if not os.path.exists(os.path.join(out, "dataset_info.json")):
        from data_pipelines.sources import ph2
        from data_pipelines.writer import write_dataset
        write_dataset(ph2.build(), out, salt=b"micle-bench", overwrite=True)
    return out
