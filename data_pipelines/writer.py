"""Writes a converted source as sharded case-bag TFRecords plus `dataset_info.json`.

A source (see `data_pipelines/sources/`) describes cases as metadata only: an id, image loaders
and a label. The writer hashes the ids, splits by case, then streams one case at a time:
load -> validate -> write, so memory does not grow with the dataset. Every image the source
read is either written or listed in `rejected` with a reason (items_read = written + rejected).
Shards and the info file are written under temporary names and renamed when complete, so a
crash never leaves a shard that looks finished.
"""
import dataclasses
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from typing import Any, Callable, List, Optional

import tensorflow as tf
from absl import logging

from data_pipelines import __version__, schema, splits
from data_pipelines.decode import ImageRejected, validate_and_normalize

INFO_FILE = "dataset_info.json"
SPLITS_FILE = "splits.json"
SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"
IMAGES_PER_SHARD = 2000  # ~100 MB of 224px JPEGs: big enough to stream, enough to interleave


@dataclasses.dataclass
class SourceImage:
    """One image reference. `item` names it in rejections (never a full path: use a CSV row
    number or a file name that carries no patient information). `load` returns its bytes."""
    item: str
    load: Callable[[], bytes]
    view: str = ""


@dataclasses.dataclass
class SourceCase:
    key: str  # the raw case id; hashed with the salt before anything is written
    images: List[SourceImage]
    label: Any = None  # int (multiclass), list of codes (multilabel), or None
    split: Optional[str] = None  # set by sources that ship their own splits (MedMNIST)
    item: str = ""  # how to name the case in messages, e.g. "rows 4-9"


@dataclasses.dataclass
class SourceData:
    name: str
    task: str
    label_names: List[str]
    cases: List[SourceCase]
    rejected: List[dict] = dataclasses.field(default_factory=list)  # rejected before loading
    items_read: int = 0  # every image row/file seen, including the ones rejected early
    citation: str = ""


def hash_case_id(raw_id, salt):
    """Salted HMAC-SHA256 of a case id (32 hex chars): stable for one salt, not reversible
    without it, so records can be shared without exposing patient ids."""
    return hmac.new(salt, str(raw_id).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def load_or_create_salt(path):
    """Reads the salt file, or creates one with 32 random bytes (mode 0600)."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            salt = f.read().strip()
        if not salt:
            raise ValueError(f"salt file {path} is empty")
        return salt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    salt = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(salt)
    return salt


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def shard_path(output_dir, split, index, count):
    return os.path.join(output_dir, SHARD_PATTERN.format(split=split, index=index, count=count))


def _existing_outputs(output_dir):
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n.endswith(".tfrecord") or n == INFO_FILE)


def write_dataset(source, output_dir, salt, fractions=splits.DEFAULT_FRACTIONS, seed=0,
                  num_shards=None, resize_to=None, overwrite=False, log_every=None):
    """Converts `source` (a SourceData) into records under `output_dir`. Returns the info dict."""
    if source.task not in schema.TASKS:
        raise ValueError(f"unknown task {source.task!r}")
    existing = _existing_outputs(output_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds records ({existing[0]}, ...); "
                              "pass overwrite=True (--overwrite) to replace them")
    os.makedirs(output_dir, exist_ok=True)
    for name in existing:
        os.remove(os.path.join(output_dir, name))
    num_classes = len(source.label_names)

    hashed = {}
    for case in source.cases:
        hid = hash_case_id(case.key, salt)
        if hid in hashed:
            raise ValueError(f"case {case.item or hid} appears twice in the source "
                             "(sources must merge rows of one case)")
        hashed[hid] = case
    preset = [c.split for c in source.cases]
    if any(s is not None for s in preset):
        if any(s is None for s in preset):
            raise ValueError("some cases carry a source split and others do not")
        assignment = {}
        for hid, case in hashed.items():
            assignment.setdefault(case.split, []).append(hid)
    else:
        assignment = splits.split_cases(list(hashed), [hashed[h].label for h in hashed],
                                        fractions=fractions, seed=seed)
    splits.check_disjoint(assignment)

    rejected = list(source.rejected)
    split_info, written_ids = {}, {}
    images_written = 0
    total_cases = len(hashed)
    log_every = log_every or max(1, total_cases // 20)
    done, start = 0, time.time()
    known = [n for n, _ in fractions if n in assignment]
    for split in known + sorted(set(assignment) - set(known)):
        ids = sorted(assignment[split])
        n_images = sum(len(hashed[h].images) for h in ids)
        count = num_shards or max(1, math.ceil(n_images / IMAGES_PER_SHARD))
        count = max(1, min(count, len(ids)))
        final = [shard_path(output_dir, split, i, count) for i in range(count)]
        temps = [f"{p}.tmp-{os.getpid()}" for p in final]
        writers = [tf.io.TFRecordWriter(t) for t in temps]
        n_cases_split = n_images_split = 0
        written_ids[split] = []
        try:
            for hid in ids:
                case = hashed[hid]
                images, formats, views = [], [], []
                for img in case.images:
                    try:
                        data = img.load()
                    except FileNotFoundError:
                        rejected.append({"item": img.item, "kind": "image", "reason": "missing file"})
                        continue
                    except OSError as e:
                        rejected.append({"item": img.item, "kind": "image",
                                         "reason": f"cannot read file: {e.strerror or e}"})
                        continue
                    try:
                        data, fmt, _ = validate_and_normalize(data, resize_to=resize_to)
                    except ImageRejected as e:
                        rejected.append({"item": img.item, "kind": "image", "reason": str(e)})
                        continue
                    images.append(data)
                    formats.append(fmt)
                    views.append(img.view)
                if not images:
                    rejected.append({"item": case.item or f"case {hid}", "kind": "case",
                                     "reason": "empty case: no valid images"})
                else:
                    record = schema.encode_case(hid, images, formats, views, case.label,
                                                source.task, num_classes)
                    writers[n_cases_split % count].write(record)
                    n_cases_split += 1
                    n_images_split += len(images)
                    written_ids[split].append(hid)
                done += 1
                if done % log_every == 0 or done == total_cases:
                    logging.info("micle-data: %d/%d cases (%.0f cases/s), %d rejected so far",
                                 done, total_cases, done / max(time.time() - start, 1e-9),
                                 len(rejected))
        finally:
            for w in writers:
                w.close()
        # Shards that received no case (more shards than surviving cases) are dropped and the
        # rest renamed so the -of-N suffix stays truthful.
        used = [t for i, t in enumerate(temps) if i < n_cases_split]
        for t in temps[len(used):]:
            os.remove(t)
        for i, t in enumerate(used):
            os.replace(t, shard_path(output_dir, split, i, len(used)))
        # Shard sizes let the reader catch a truncated or replaced shard with one stat per
        # file before training (TF reads a shard cut inside a record header as a clean EOF).
        split_info[split] = {"cases": n_cases_split, "images": n_images_split, "shards": len(used),
                             "shard_bytes": [os.path.getsize(shard_path(output_dir, split, i,
                                                                        len(used)))
                                             for i in range(len(used))]}
        images_written += n_images_split

    items_rejected = sum(1 for r in rejected if r.get("kind", "image") == "image")
    info = {
        "task": source.task,
        "label_names": list(source.label_names),
        "image_size": resize_to,
        "splits": split_info,
        "num_cases": sum(s["cases"] for s in split_info.values()),
        "num_images": images_written,
        "rejected": rejected,
        "num_rejected": len(rejected),
        "items_read": source.items_read,
        "items_written": images_written,
        "items_rejected": items_rejected,
        "source": source.name,
        "citation": source.citation,
        "created_by": f"micle-tf {__version__} (data_pipelines)",
        "split_seed": seed,
        "split_fractions": {n: f for n, f in fractions},
        "salt_fingerprint": hash_case_id("micle-tf salt fingerprint", salt)[:12],
        "shard_pattern": SHARD_PATTERN,
    }
    if source.items_read != images_written + items_rejected:
        raise AssertionError(
            f"accounting error: read {source.items_read} images, wrote {images_written}, "
            f"rejected {items_rejected}")
    write_json_atomic(os.path.join(output_dir, SPLITS_FILE), written_ids)
    write_json_atomic(os.path.join(output_dir, INFO_FILE), info)
    logging.info("micle-data: wrote %d cases / %d images to %s (%s); rejected %d",
                 info["num_cases"], images_written, output_dir,
                 ", ".join(f"{k}: {v['cases']}" for k, v in split_info.items()), len(rejected))
    return info


def read_info(data_dir):
    path = os.path.join(data_dir, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {data_dir} a micle-data output directory?")
    with open(path) as f:
        info = json.load(f)
    for key in ("task", "label_names", "splits"):
        if key not in info:
            raise ValueError(f"{path} lacks the key {key!r}")
    return info
