"""Writes a converted source as sharded case-bag TFRecords plus `dataset_info.json`.

A source (see `data_pipelines/sources/`) describes cases as metadata only: an id, image loaders
and a label. The writer hashes the ids and works in two passes:

1. check, in source order: load -> `prepare.prepare_image` (pixel limit, lossless metadata
   removal, the reader's TensorFlow decode, SHA-256 of the decoded pixels) -> duplicate check
   (within a case always; across cases by `duplicates` policy). What passes is spooled to one
   temporary file beside the output, so pass 2 writes exactly the bytes that were checked;
   memory holds a few hashes per image, never the images.
2. split by case (cases sharing an image as one unit under `duplicates="group"`), then write
   each split's shards from the spool.

Every image the source read is either written or listed in `rejected` with a reason
(items_read = written + rejected).

Case attributes (`SourceCase.attributes`, see `data_pipelines/attributes.py`) are written as
`case/attr/<name>`; an image-level attribute given per image (view, modality, manufacturer)
takes the common value of the images actually written, or "mixed". `dataset_info.json` counts
them: `case_attributes: {split: {name: {token: cases}}}`. These counts are not suppressed:
coarse tokens counted over a whole split do not identify anyone (small subgroups are
suppressed where metrics are reported, in `micle_tf.evaluation.subgroups`).

Shards and the info file are written under temporary names and renamed when complete; a failed
run removes its temporary files, so a crash never leaves a shard that looks finished.
"""
import collections
import dataclasses
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
import time
from typing import Any, Callable, List, Optional

import tensorflow as tf
from absl import logging

from data_pipelines import __version__, attributes as case_attributes, schema, splits
from data_pipelines.decode import ImageRejected
from data_pipelines.prepare import DEFAULT_MAX_PIXELS, prepare_image

INFO_FILE = "dataset_info.json"
SPLITS_FILE = "splits.json"
SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"
IMAGES_PER_SHARD = 2000  # ~100 MB of 224px JPEGs: big enough to stream, enough to interleave
DUPLICATE_POLICIES = ("reject", "group", "allow")
WITHIN_CASE_DUPLICATE = "duplicate image within the case"  # reason prefix (sources use it too)


class NotARegularFile(OSError):
    """A path that is a FIFO, device, socket or folder: reading it could block forever."""


class EmptyDatasetError(ValueError):
    """No case survived the conversion; `rejected` holds every rejection."""

    def __init__(self, message, rejected):
        super().__init__(message)
        self.rejected = rejected


def file_loader(path):
    """A `SourceImage.load` for a file on disk. Opens without blocking and refuses anything
    but a regular file (a FIFO would hang the conversion; a folder is not an image)."""
    def load():
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotARegularFile(0, "not a regular file (a FIFO, device or folder)")
            with os.fdopen(fd, "rb") as f:
                fd = None
                return f.read()
        finally:
            if fd is not None:
                os.close(fd)
    return load


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
    # {name: token} of schema.CASE_ATTRIBUTES; an image-level one (schema.IMAGE_LEVEL_ATTRIBUTES)
    # may instead be a list with one token per image (the writer combines the written ones)
    attributes: dict = dataclasses.field(default_factory=dict)


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
    """What a conversion writes (or a killed one left behind) in `output_dir`."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n.endswith(".tfrecord") or n in (INFO_FILE, SPLITS_FILE) or ".tmp-" in n)


def _remove_temporaries(output_dir, pid):
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.endswith(f".tmp-{pid}"):
                os.remove(os.path.join(output_dir, name))


@dataclasses.dataclass
class _Checked:
    """An image that passed pass 1: where its bytes sit in the spool, and what it is."""
    item: str
    view: str
    fmt: str
    digest: str
    offset: int
    length: int
    index: int = -1  # position in the SourceCase's `images`


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def write_dataset(source, output_dir, salt, fractions=splits.DEFAULT_FRACTIONS, seed=0,
                  num_shards=None, resize_to=None, overwrite=False, log_every=None,
                  duplicates="reject", max_pixels=DEFAULT_MAX_PIXELS):
    """Converts `source` (a SourceData) into records under `output_dir`. Returns the info dict.

    duplicates: what to do with an image whose decoded pixels are already in ANOTHER case
      (within one case a repeat is always rejected, naming the first):
      "reject" (default) keeps the first occurrence in source order and rejects later copies,
      naming both items; "group" keeps them and puts every case sharing an image into one
      split; "allow" keeps them where the case split puts them (the evaluator will then refuse
      a split that shares an image with the training split). The info file's `duplicates`
      block says which policy ran and how many copies it found.
    max_pixels: images whose declared width x height exceeds it are rejected before decoding.
    Raises EmptyDatasetError (nothing written) when no case survives."""
    if source.task not in schema.TASKS:
        raise ValueError(f"unknown task {source.task!r}")
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    if resize_to is not None and int(resize_to) <= 0:
        raise ValueError(f"image size must be a positive number of pixels, got {resize_to}")
    output_dir = os.path.expanduser(output_dir)
    existing = _existing_outputs(output_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds records ({existing[0]}, ...); "
                              "pass overwrite=True (--overwrite) to replace them")
    os.makedirs(output_dir, exist_ok=True)
    for name in existing:
        os.remove(os.path.join(output_dir, name))
    num_classes = len(source.label_names)

    hashed, order = {}, []
    for case in source.cases:
        hid = hash_case_id(case.key, salt)
        if hid in hashed:
            raise ValueError(f"case {case.item or hid} appears twice in the source "
                             "(sources must merge rows of one case)")
        hashed[hid] = case
        order.append(hid)
        _check_attributes(case, hid)
    preset = [c.split for c in source.cases]
    if any(s is not None for s in preset) and any(s is None for s in preset):
        raise ValueError("some cases carry a source split and others do not")

    pid = os.getpid()
    spool_path = os.path.join(output_dir, f".checked-images.tmp-{pid}")
    try:
        with open(spool_path, "w+b") as spool:
            checked, rejected, dup = _check_images(source, hashed, order, spool, resize_to,
                                                   max_pixels, duplicates, log_every)
            survivors = [h for h in order if checked[h]]
            if not survivors:
                raise EmptyDatasetError(_nothing_written(source, rejected), rejected)
            assignment = _assign_splits(hashed, survivors, dup.pop("links"), duplicates,
                                        preset, fractions, seed)
            split_info, written_ids, attribute_counts = _write_splits(
                output_dir, assignment, hashed, checked, spool, source.task, num_classes,
                fractions, num_shards, pid)
    except BaseException:
        _remove_temporaries(output_dir, pid)
        raise
    finally:
        if os.path.exists(spool_path):
            os.remove(spool_path)
    images_written = sum(s["images"] for s in split_info.values())
    split_of = {h: name for name, ids in written_ids.items() for h in ids}
    splits_of_digest = collections.defaultdict(set)
    for hid, split in split_of.items():
        for img in checked[hid]:
            splits_of_digest[img.digest].add(split)
    dup["across_splits"] = sum(1 for v in splits_of_digest.values() if len(v) > 1)
    dup["distinct_images"] = len(splits_of_digest)
    dup["within_case"] = sum(1 for r in rejected
                             if r["reason"].startswith(WITHIN_CASE_DUPLICATE))

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
        "duplicates": dup,
        "case_attributes": attribute_counts,
        "source": source.name,
        "citation": source.citation,
        "created_by": f"micle-tf {__version__} (data_pipelines)",
        "split_seed": seed,
        "split_fractions": {n: f for n, f in fractions},
        "salt_fingerprint": hash_case_id("micle-tf salt fingerprint", salt)[:12],
        "shard_pattern": SHARD_PATTERN,
        "max_image_pixels": max_pixels,
    }
    if source.items_read != images_written + items_rejected:
        raise AssertionError(
            f"accounting error: read {source.items_read} images, wrote {images_written}, "
            f"rejected {items_rejected}")
    write_json_atomic(os.path.join(output_dir, SPLITS_FILE), written_ids)
    write_json_atomic(os.path.join(output_dir, INFO_FILE), info)
    logging.info("micle-data: wrote %d cases / %d images to %s (%s); rejected %d; duplicates "
                 "(%s): %d across cases, %d within cases, %d across splits", info["num_cases"],
                 images_written, output_dir,
                 ", ".join(f"{k}: {v['cases']}" for k, v in split_info.items()), len(rejected),
                 duplicates, dup["across_cases"], dup["within_case"], dup["across_splits"])
    return info


def _check_images(source, hashed, order, spool, resize_to, max_pixels, policy, log_every):
    """Pass 1, in source order. Returns ({hid: [_Checked]}, rejected, duplicates summary with
    the (first case, later case) links of cross-case copies)."""
    rejected = list(source.rejected)
    checked = {}
    first_seen = {}  # pixel digest -> (item, hid) of its first occurrence
    links, across, rejected_across = [], 0, 0
    total = len(order)
    log_every = log_every or max(1, total // 20)
    start, n_images = time.time(), 0
    for done, hid in enumerate(order, start=1):
        case = hashed[hid]
        kept, in_case = [], {}
        for index, img in enumerate(case.images):
            n_images += 1
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
                prepared = prepare_image(data, resize_to=resize_to, max_pixels=max_pixels)
            except ImageRejected as e:
                rejected.append({"item": img.item, "kind": "image", "reason": str(e)})
                continue
            digest = prepared.pixel_sha256
            if digest in in_case:
                rejected.append({"item": img.item, "kind": "image", "reason":
                                 f"{WITHIN_CASE_DUPLICATE} (same decoded pixels as "
                                 f"{in_case[digest]})"})
                continue
            first = first_seen.get(digest)
            if first is not None:
                across += 1
                if policy == "reject":
                    rejected_across += 1
                    rejected.append({"item": img.item, "kind": "image", "reason":
                                     f"same decoded pixels as {first[0]} of another case; "
                                     "--duplicates=reject keeps the first occurrence"})
                    continue
                links.append((first[1], hid))
            else:
                first_seen[digest] = (img.item, hid)
            in_case[digest] = img.item
            offset = spool.seek(0, os.SEEK_END)
            spool.write(prepared.data)
            kept.append(_Checked(img.item, img.view, prepared.format, digest, offset,
                                 len(prepared.data), index))
        if not kept:
            rejected.append({"item": case.item or f"case {hid}", "kind": "case",
                             "reason": "empty case: no valid images"})
        checked[hid] = kept
        if done % log_every == 0 or done == total:
            logging.info("micle-data: checked %d/%d cases, %d images (%.0f images/s), "
                         "%d rejected so far", done, total, n_images,
                         n_images / max(time.time() - start, 1e-9), len(rejected))
    dup = {"policy": policy, "across_cases": across, "rejected_across_cases": rejected_across,
           "links": links}
    return checked, rejected, dup


def _assign_splits(hashed, survivors, links, policy, preset, fractions, seed):
    """{split: [hid]} for the surviving cases (groups of cases sharing an image kept together
    under the "group" policy)."""
    uf = _UnionFind()
    if policy == "group":
        for a, b in links:
            uf.union(a, b)
    groups = collections.OrderedDict()
    for hid in survivors:
        groups.setdefault(uf.find(hid), []).append(hid)
    if any(s is not None for s in preset):
        assignment = {}
        for members in groups.values():
            names = {hashed[h].split for h in members}
            if len(names) > 1:
                items = ", ".join(hashed[h].item for h in members[:4])
                raise ValueError(f"cases {items} share an image but the source puts them in "
                                 f"the splits {sorted(names)}; --duplicates=group cannot move "
                                 "cases of a source with its own splits (use reject)")
            for h in members:
                assignment.setdefault(hashed[h].split, []).append(h)
    elif policy == "group":
        assignment = splits.split_groups(list(groups.values()),
                                         [hashed[g[0]].label for g in groups.values()],
                                         fractions=fractions, seed=seed)
    else:
        assignment = splits.split_cases(survivors, [hashed[h].label for h in survivors],
                                        fractions=fractions, seed=seed)
    splits.check_disjoint(assignment)
    grouped = sum(len(g) for g in groups.values() if len(g) > 1)
    if grouped:
        logging.info("micle-data: %d cases share images with another case; kept in %d groups, "
                     "one split each", grouped, sum(1 for g in groups.values() if len(g) > 1))
    return {name: ids for name, ids in assignment.items() if ids}


def _write_splits(output_dir, assignment, hashed, checked, spool, task, num_classes,
                  fractions, num_shards, pid):
    """Pass 2: every split's shards from the spool. Returns (split info, {split: [hid]},
    {split: {attribute: {token: cases}}})."""
    split_info, written_ids, attribute_counts = {}, {}, {}
    known = [n for n, _ in fractions if n in assignment]
    for split in known + sorted(set(assignment) - set(known)):
        ids = sorted(assignment[split])
        n_images = sum(len(checked[h]) for h in ids)
        count = num_shards or max(1, math.ceil(n_images / IMAGES_PER_SHARD))
        count = max(1, min(count, len(ids)))
        final = [shard_path(output_dir, split, i, count) for i in range(count)]
        temps = [f"{p}.tmp-{pid}" for p in final]
        writers = [tf.io.TFRecordWriter(t) for t in temps]
        counts = collections.defaultdict(collections.Counter)
        try:
            for n, hid in enumerate(ids):
                images = []
                for img in checked[hid]:
                    spool.seek(img.offset)
                    images.append(spool.read(img.length))
                attrs = case_attributes.resolve_case_attributes(
                    hashed[hid].attributes, [i.index for i in checked[hid]])
                for name, value in attrs.items():
                    counts[name][value] += 1
                record = schema.encode_case(
                    hid, images, [i.fmt for i in checked[hid]], [i.view for i in checked[hid]],
                    hashed[hid].label, task, num_classes,
                    pixel_sha256=[i.digest for i in checked[hid]], attributes=attrs)
                writers[n % count].write(record)
        finally:
            for w in writers:
                w.close()
        for t, p in zip(temps, final):
            os.replace(t, p)
        # Shard sizes let the reader catch a truncated or replaced shard with one stat per
        # file before training (TF reads a shard cut inside a record header as a clean EOF).
        split_info[split] = {"cases": len(ids), "images": n_images, "shards": count,
                             "shard_bytes": [os.path.getsize(p) for p in final]}
        written_ids[split] = ids
        attribute_counts[split] = {name: dict(sorted(c.items())) for name, c in counts.items()}
    return split_info, written_ids, attribute_counts


def _check_attributes(case, hid):
    """Fails fast (before any image is read) on attribute names or tokens outside the schema,
    and on per-image lists whose length is not the number of images."""
    plain = {}
    for name, value in case.attributes.items():
        if isinstance(value, (list, tuple)):
            if name not in schema.IMAGE_LEVEL_ATTRIBUTES:
                raise ValueError(f"case {case.item or hid}: only {schema.IMAGE_LEVEL_ATTRIBUTES}"
                                 f" may be given per image, not {name!r}")
            if len(value) != len(case.images):
                raise ValueError(f"case {case.item or hid}: {len(value)} {name} values for "
                                 f"{len(case.images)} images")
            for v in value:
                schema.check_case_attributes({name: v}, case.item or hid)
        else:
            plain[name] = value
    schema.check_case_attributes(plain, case.item or hid)


def _nothing_written(source, rejected):
    reasons = collections.Counter(r["reason"] for r in rejected if r.get("kind") != "case")
    top = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
    return (f"no case could be written: all {source.items_read} image(s) of the {source.name} "
            f"source were rejected ({top or 'the source described no image'})")


def read_info(data_dir):
    path = os.path.join(data_dir, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {data_dir} a micle-data output directory?")
    with open(path) as f:
        try:
            info = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg}); restore it or rewrite the records with micle-data"
                             ) from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} does not hold a JSON object; rewrite it with micle-data")
    for key in ("task", "label_names", "splits"):
        if key not in info:
            raise ValueError(f"{path} lacks the key {key!r}")
    return info
