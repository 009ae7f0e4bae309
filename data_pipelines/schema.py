"""The case-bag record: one `tf.train.Example` per patient case.

Feature keys (the on-disk contract; also listed in the README):

| key                | type            | meaning                                                      |
|--------------------|-----------------|--------------------------------------------------------------|
| `case/id`          | bytes [1]       | salted HMAC-SHA256 of the source case id (hex); never raw     |
| `case/num_images`  | int64 [1]       | N, the number of images in the bag (N >= 1)                  |
| `image/encoded`    | bytes [N]       | PNG or JPEG bytes, decoded in the pipeline                   |
| `image/format`     | bytes [N]       | "png" or "jpeg"                                               |
| `image/view`       | bytes [N]       | view tag where known ("PA", "lateral", ...), else ""          |
| `image/pixel_sha256` | bytes [N]     | SHA-256 (hex) of the decoded pixels with shape and bit depth  |
| `label/class`      | int64 [0 or 1]  | multiclass: index into `label_names`; absent = unlabelled     |
| `label/multi`      | int64 [0 or C]  | multilabel: one code per label name (see below); absent = none|
| `case/attr/<name>` | bytes [0 or 1]  | a non-identifying case attribute, a token of a fixed vocabulary (below); absent = the source does not have it |

`image/pixel_sha256` identifies content, not a person: the hash of what TensorFlow decodes
(after grey -> RGB tiling and alpha removal), so two files holding the same picture share it. The
writer rejects or groups such copies; the evaluator refuses a split sharing one with training
(see `data_pipelines.prepare`). Records written before it existed simply lack the key.

Multilabel codes: 1 positive, 0 negative, -1 uncertain (e.g. CheXpert's -1.0), -2 missing
(a blank cell). Keeping uncertain and missing distinct lets fine-tuning choose a policy later.

Case attributes (`case/attr/<name>`, for subgroup analysis): only the names of
`CASE_ATTRIBUTES`, and only the tokens of `CASE_ATTRIBUTE_VALUES[name]` (`encode_case` refuses
anything else, so no free text, date or raw age can enter a record through them):

| name           | tokens                                                                   |
|----------------|--------------------------------------------------------------------------|
| `sex`          | female, male, other, unknown                                             |
| `age_band`     | 0-9, 10-19, ..., 80-89, 90+ (10-year bands, 90 and older pooled), unknown |
| `view`         | pa, ap, frontal (projection not given), lateral, other, mixed, unknown   |
| `site`         | HAM10000's localization vocabulary (abdomen, acral, back, chest, ear, face, foot, genital, hand, lower_extremity, neck, scalp, trunk, upper_extremity), other, unknown |
| `dx_type`      | histo, follow_up, consensus, confocal, other, unknown                    |
| `modality`     | DICOM modality codes lower-cased (cr, dx, ct, mr, us, mg, ...), other, mixed, unknown |
| `manufacturer` | a major vendor token (agfa, canon, carestream, esaote, fujifilm, ge, hitachi, hologic, kodak, konica_minolta, mindray, philips, samsung, shimadzu, siemens, toshiba), other, mixed, unknown |

`view`, `modality` and `manufacturer` describe acquisitions (`IMAGE_LEVEL_ATTRIBUTES`): the case
value is the images' common token, or `mixed` when the written images disagree. The others
describe the patient or lesion and come from the case's first row. How each source maps its
columns is in `data_pipelines/attributes.py`. `parse_case_attributes` reads them apart from
`parse_case` (records written before the keys existed have none).

Parsed form (what `parse_case` returns): `case_id` tf.string scalar, `encoded` tf.string [N],
`label` int32 scalar (multiclass, -1 = unlabelled) or int32 [C] (multilabel, all -2 = none).
"""
import tensorflow as tf

CASE_ID = "case/id"
NUM_IMAGES = "case/num_images"
IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_VIEW = "image/view"
IMAGE_PIXEL_SHA256 = "image/pixel_sha256"
LABEL_CLASS = "label/class"
LABEL_MULTI = "label/multi"

CASE_ATTRIBUTE_PREFIX = "case/attr/"

POSITIVE, NEGATIVE, UNCERTAIN, MISSING = 1, 0, -1, -2
UNLABELLED = -1  # multiclass "no label"
TASKS = ("multiclass", "multilabel")
IMAGE_FORMATS = ("png", "jpeg")

# Case attributes: names and their fixed vocabularies (the record contract; see the docstring).
UNKNOWN, OTHER, MIXED = "unknown", "other", "mixed"
AGE_BANDS = tuple(f"{10 * i}-{10 * i + 9}" for i in range(9)) + ("90+",)
SITES = ("abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
         "lower_extremity", "neck", "scalp", "trunk", "upper_extremity")
MODALITIES = ("cr", "dx", "mg", "ct", "mr", "us", "pt", "nm", "xa", "rf", "io", "px", "op",
              "sm", "xc", "es", "ot")
MANUFACTURERS = ("agfa", "canon", "carestream", "esaote", "fujifilm", "ge", "hitachi",
                 "hologic", "kodak", "konica_minolta", "mindray", "philips", "samsung",
                 "shimadzu", "siemens", "toshiba")
CASE_ATTRIBUTE_VALUES = {
    "sex": ("female", "male", OTHER, UNKNOWN),
    "age_band": AGE_BANDS + (UNKNOWN,),
    "view": ("pa", "ap", "frontal", "lateral", OTHER, MIXED, UNKNOWN),
    "site": SITES + (OTHER, UNKNOWN),
    "dx_type": ("histo", "follow_up", "consensus", "confocal", OTHER, UNKNOWN),
    "modality": MODALITIES + (OTHER, MIXED, UNKNOWN),
    "manufacturer": MANUFACTURERS + (OTHER, MIXED, UNKNOWN),
}
CASE_ATTRIBUTES = tuple(CASE_ATTRIBUTE_VALUES)
IMAGE_LEVEL_ATTRIBUTES = ("view", "modality", "manufacturer")


def attribute_key(name):
    """The feature key of a case attribute: `case/attr/<name>`."""
    return CASE_ATTRIBUTE_PREFIX + name


def check_case_attributes(attributes, case_id=""):
    """Validates {name: token}: names from CASE_ATTRIBUTES, tokens from their vocabulary.
    Returns the dict with str values; raises ValueError naming the offending entry."""
    out = {}
    for name, value in (attributes or {}).items():
        if name not in CASE_ATTRIBUTE_VALUES:
            raise ValueError(f"case {case_id}: unknown case attribute {name!r}; expected one "
                             f"of {CASE_ATTRIBUTES}")
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or value not in CASE_ATTRIBUTE_VALUES[name]:
            # the value itself is not echoed: it may be the raw text a source forgot to map
            raise ValueError(f"case {case_id}: case attribute {name!r} must be one of "
                             f"{CASE_ATTRIBUTE_VALUES[name]} (got a {type(value).__name__} "
                             "outside the vocabulary; map source values with "
                             "data_pipelines.attributes)")
        out[name] = value
    return out


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_case(case_id, images, formats, views=None, label=None, task="multiclass",
                num_classes=None, pixel_sha256=None, attributes=None):
    """Serialises one case. `label` is an int (multiclass), a sequence of codes (multilabel)
    or None (unlabelled); `pixel_sha256` one hex digest per image (the writer always gives
    them); `attributes` {name: token} written as `case/attr/<name>` (names and tokens checked
    against CASE_ATTRIBUTE_VALUES). Validates everything a reader later relies on."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not images:
        raise ValueError(f"case {case_id}: empty bag (no images)")
    if len(formats) != len(images):
        raise ValueError(f"case {case_id}: {len(images)} images but {len(formats)} formats")
    views = list(views) if views is not None else [""] * len(images)
    if len(views) != len(images):
        raise ValueError(f"case {case_id}: {len(images)} images but {len(views)} view tags")
    if pixel_sha256 is not None and len(pixel_sha256) != len(images):
        raise ValueError(f"case {case_id}: {len(images)} images but {len(pixel_sha256)} "
                         "pixel hashes")
    for f in formats:
        if f not in IMAGE_FORMATS:
            raise ValueError(f"case {case_id}: image format {f!r} not in {IMAGE_FORMATS}")
    feature = {
        CASE_ID: _bytes([case_id.encode() if isinstance(case_id, str) else case_id]),
        NUM_IMAGES: _ints([len(images)]),
        IMAGE_ENCODED: _bytes(images),
        IMAGE_FORMAT: _bytes(f.encode() for f in formats),
        IMAGE_VIEW: _bytes(v.encode() for v in views),
    }
    if pixel_sha256 is not None:
        feature[IMAGE_PIXEL_SHA256] = _bytes(h.encode() for h in pixel_sha256)
    for name, value in check_case_attributes(attributes, case_id).items():
        feature[attribute_key(name)] = _bytes([value.encode("ascii")])
    if label is not None:
        if task == "multiclass":
            label = int(label)
            if not 0 <= label < (num_classes if num_classes is not None else label + 1):
                raise ValueError(f"case {case_id}: label {label} out of range [0, {num_classes})")
            feature[LABEL_CLASS] = _ints([label])
        else:
            codes = [int(c) for c in label]
            if num_classes is not None and len(codes) != num_classes:
                raise ValueError(f"case {case_id}: {len(codes)} label codes, expected {num_classes}")
            bad = [c for c in codes if c not in (POSITIVE, NEGATIVE, UNCERTAIN, MISSING)]
            if bad:
                raise ValueError(f"case {case_id}: invalid multilabel codes {bad}")
            feature[LABEL_MULTI] = _ints(codes)
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


_FEATURE_SPEC = {
    CASE_ID: tf.io.FixedLenFeature([], tf.string),
    NUM_IMAGES: tf.io.FixedLenFeature([], tf.int64),
    IMAGE_ENCODED: tf.io.VarLenFeature(tf.string),
    IMAGE_FORMAT: tf.io.VarLenFeature(tf.string),
    IMAGE_VIEW: tf.io.VarLenFeature(tf.string),
    LABEL_CLASS: tf.io.VarLenFeature(tf.int64),
    LABEL_MULTI: tf.io.VarLenFeature(tf.int64),
}


_HASH_SPEC = {CASE_ID: tf.io.FixedLenFeature([], tf.string),
              IMAGE_PIXEL_SHA256: tf.io.VarLenFeature(tf.string)}


def parse_pixel_hashes(serialized):
    """{"case_id", "pixel_sha256": tf.string [N] (empty for records written before the key
    existed)} of one serialized case, without touching the image bytes."""
    ex = tf.io.parse_single_example(serialized, _HASH_SPEC)
    return {"case_id": ex[CASE_ID],
            "pixel_sha256": tf.sparse.to_dense(ex[IMAGE_PIXEL_SHA256], default_value="")}


_ATTRIBUTE_SPEC = {CASE_ID: tf.io.FixedLenFeature([], tf.string),
                   **{attribute_key(n): tf.io.VarLenFeature(tf.string) for n in CASE_ATTRIBUTES}}


def parse_case_attributes(serialized):
    """{"case_id", "attributes": {name: tf.string scalar, "" when the record lacks it}} of one
    serialized case, for every name of CASE_ATTRIBUTES, without touching the image bytes."""
    ex = tf.io.parse_single_example(serialized, _ATTRIBUTE_SPEC)
    attributes = {}
    for name in CASE_ATTRIBUTES:
        values = tf.sparse.to_dense(ex[attribute_key(name)], default_value="")
        attributes[name] = tf.cond(tf.size(values) > 0, lambda v=values: v[0],
                                   lambda: tf.constant(""))
    return {"case_id": ex[CASE_ID], "attributes": attributes}


def parse_case(serialized, task, num_classes):
    """Parses one serialized case (graph-safe; used inside tf.data).

    Raises InvalidArgumentError (naming the case id) for an empty bag, a count that disagrees
    with the bag, or a label outside [0, num_classes)."""
    ex = tf.io.parse_single_example(serialized, _FEATURE_SPEC)
    case_id = ex[CASE_ID]
    encoded = tf.sparse.to_dense(ex[IMAGE_ENCODED], default_value="")
    n = tf.shape(encoded, out_type=tf.int64)[0]
    def check(condition, what):
        return tf.debugging.Assert(condition, [what, case_id])

    checks = [
        check(n > 0, "empty case bag in case"),
        check(tf.equal(n, ex[NUM_IMAGES]), "case/num_images disagrees with the bag size in case"),
    ]
    if task == "multiclass":
        values = ex[LABEL_CLASS].values
        label = tf.cond(tf.size(values) > 0, lambda: values[0],
                        lambda: tf.constant(UNLABELLED, tf.int64))
        checks.append(check((label >= UNLABELLED) & (label < num_classes),
                            f"label/class outside [0, {num_classes}) in case"))
    else:
        values = ex[LABEL_MULTI].values
        label = tf.cond(tf.size(values) > 0, lambda: values,
                        lambda: tf.fill([num_classes], tf.constant(MISSING, tf.int64)))
        checks.append(check(tf.equal(tf.size(label), num_classes),
                            f"label/multi does not have {num_classes} entries in case"))
        checks.append(check(tf.reduce_all((label >= MISSING) & (label <= POSITIVE)),
                            "invalid label/multi code in case"))
        label = tf.ensure_shape(label, [num_classes])
    with tf.control_dependencies(checks):
        label = tf.cast(tf.identity(label), tf.int32)
    return {"case_id": case_id, "encoded": encoded, "label": label}
