"""Non-identifying case attributes: how source values become the fixed tokens of the records.

Subgroup analysis (`micle-evaluate --subgroups=sex,age_band`) needs a few facts about each case;
privacy forbids copying the source's cells as they are. Every function here maps one source
value to a token of `schema.CASE_ATTRIBUTE_VALUES[name]` (a fixed vocabulary or a coarse bin),
case-insensitively; empty or unreadable values give "unknown", readable values outside the
vocabulary give "other". Nothing is ever copied as free text, so a typo, a name or a date in a
cell cannot reach a record (and `schema.encode_case` refuses any token outside the vocabulary).

| attribute      | from (source: column)                                        | mapping |
|----------------|--------------------------------------------------------------|---------|
| `sex`          | HAM10000 `sex`, CheXpert `Sex`, NIH `Patient Gender`, DICOM PatientSex, folder `sex` | F/female -> female, M/male -> male, O/other -> other, else unknown |
| `age_band`     | HAM10000 `age`, CheXpert `Age`, NIH `Patient Age`, DICOM PatientAge, folder `age` | see `age_band` |
| `view`         | CheXpert `Frontal/Lateral` + `AP/PA`, NIH `View Position`, folder `view` (the image view tags) | see `view` |
| `site`         | HAM10000 `localization`, folder `site`                        | HAM10000's vocabulary (spaces -> `_`), else other |
| `dx_type`      | HAM10000 `dx_type`                                            | histo, follow_up, consensus, confocal, else other |
| `modality`     | DICOM Modality                                                | the code lower-cased if in `schema.MODALITIES`, else other |
| `manufacturer` | DICOM Manufacturer (free text)                                | a vendor token of `schema.MANUFACTURERS` found in it, else other |

Ages: only a 10-year band is stored, and 90 and older are pooled into "90+" (as HIPAA's Safe
Harbor rule asks for ages over 89). The age is never derived from dates: a DICOM file without
PatientAge is "unknown" even when PatientBirthDate and StudyDate are present, and no date
attribute is read at all.

Case level: `view`, `modality` and `manufacturer` (`schema.IMAGE_LEVEL_ATTRIBUTES`) are given
per image, and the writer stores the common token of the images it actually writes, or "mixed"
(`case_value`). The other attributes describe the patient or the lesion and come from the
case's first row (CSV order; for DICOM the first file in walk order) - in particular a patient
whose age differs across follow-up studies (CheXpert, NIH) gets the first row's age band.
"""
import math
import re

from data_pipelines import schema

UNKNOWN, OTHER, MIXED = schema.UNKNOWN, schema.OTHER, schema.MIXED
MAX_AGE_YEARS = 120  # older values are data errors (the NIH release has a few 4xx ages)

_SEX = {"f": "female", "female": "female", "m": "male", "male": "male", "o": "other",
        "other": "other"}
_AGE_RE = re.compile(r"^(\d+(?:\.\d*)?)\s*([ymwd])?$")
_AGE_UNIT_YEARS = {"y": 1.0, "m": 1.0 / 12.0, "w": 7.0 / 365.25, "d": 1.0 / 365.25}
_VIEWS = {"pa": "pa", "frontal_pa": "pa", "ap": "ap", "frontal_ap": "ap",
          "frontal": "frontal", "frontal_ll": "frontal", "frontal_rl": "frontal",
          "lateral": "lateral", "lat": "lateral", "ll": "lateral", "rl": "lateral"}
_DX_TYPES = {"histo": "histo", "histopathology": "histo", "follow_up": "follow_up",
             "followup": "follow_up", "consensus": "consensus", "confocal": "confocal"}
# Manufacturer: the first rule that matches the lower-cased words of the cell wins.
_VENDOR_RULES = (
    ("ge", lambda words, text: words[:1] == ["ge"] or "general electric" in text),
    ("siemens", lambda words, text: "siemens" in words),
    ("philips", lambda words, text: "philips" in words),
    ("canon", lambda words, text: "canon" in words),
    ("toshiba", lambda words, text: any(w.startswith("toshiba") for w in words)),
    ("fujifilm", lambda words, text: any(w.startswith("fuji") for w in words)),
    ("carestream", lambda words, text: "carestream" in words),
    ("kodak", lambda words, text: "kodak" in words),
    ("agfa", lambda words, text: any(w.startswith("agfa") for w in words)),
    ("konica_minolta", lambda words, text: "konica" in words or "minolta" in words),
    ("hologic", lambda words, text: "hologic" in words),
    ("samsung", lambda words, text: "samsung" in words),
    ("shimadzu", lambda words, text: "shimadzu" in words),
    ("hitachi", lambda words, text: "hitachi" in words),
    ("esaote", lambda words, text: "esaote" in words),
    ("mindray", lambda words, text: "mindray" in words),
)


def _text(value):
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()


def sex(value):
    """'F'/'female' -> female, 'M'/'male' -> male, 'O'/'other' -> other, else unknown."""
    return _SEX.get(_text(value).lower(), UNKNOWN)


def age_years(value):
    """Age in years (float) or None: numbers ("60.0", "68", 47), NIH's "058Y" and DICOM Age
    Strings "nnnD|W|M|Y" (days, weeks, months, years). Negative, NaN, > MAX_AGE_YEARS or
    anything else unreadable -> None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        years = float(value)
    else:
        m = _AGE_RE.match(_text(value).lower())
        if not m:
            return None
        years = float(m.group(1)) * _AGE_UNIT_YEARS[m.group(2) or "y"]
    if math.isnan(years) or years < 0 or years > MAX_AGE_YEARS:
        return None
    return years


def age_band(value):
    """'0-9', '10-19', ..., '80-89', '90+' (90 and older pooled) or 'unknown'."""
    years = age_years(value)
    if years is None:
        return UNKNOWN
    if years >= 90:
        return "90+"
    lo = int(years // 10) * 10
    return f"{lo}-{lo + 9}"


def view(tag):
    """An image view tag (CheXpert's frontal_PA/frontal_AP/lateral/..., NIH and DICOM PA/AP/
    LL/LAT, a folder CSV's `view`) -> pa, ap, frontal (projection not given), lateral; empty ->
    unknown; any other text -> other."""
    t = _text(tag).lower().replace(" ", "_").replace("-", "_")
    if not t:
        return UNKNOWN
    return _VIEWS.get(t, OTHER)


def site(value):
    """HAM10000 `localization` ('lower extremity' -> lower_extremity, ...) -> its token; empty
    or 'unknown' -> unknown; anything else -> other."""
    t = re.sub(r"[\s\-]+", "_", _text(value).lower())
    if t in ("", UNKNOWN):
        return UNKNOWN
    return t if t in schema.SITES else OTHER


def dx_type(value):
    """HAM10000 `dx_type`: histo, follow_up, consensus, confocal; empty -> unknown; else other."""
    t = re.sub(r"[\s\-]+", "_", _text(value).lower())
    if t in ("", UNKNOWN):
        return UNKNOWN
    return _DX_TYPES.get(t, OTHER)


def modality(value):
    """DICOM Modality code (CR, DX, CT, ...) lower-cased if in schema.MODALITIES; empty ->
    unknown; any other code -> other."""
    t = _text(value).lower()
    if not t:
        return UNKNOWN
    return t if t in schema.MODALITIES else OTHER


def manufacturer(value):
    """DICOM Manufacturer (free text, e.g. 'Philips Medical Systems', 'GE MEDICAL SYSTEMS',
    'FUJIFILM Corporation') -> the token of the first major vendor of schema.MANUFACTURERS it
    names; empty -> unknown; any other text -> other (nothing of the text is kept)."""
    text = _text(value).lower()
    if not text:
        return UNKNOWN
    words = re.findall(r"[a-z0-9]+", text)
    for token, rule in _VENDOR_RULES:
        if rule(words, " ".join(words)):
            return token
    return OTHER


def case_value(tokens):
    """One case's value of an image-level attribute from its images' tokens: the common token,
    or 'mixed' when they differ ('unknown' for no image)."""
    distinct = list(dict.fromkeys(tokens))
    if not distinct:
        return UNKNOWN
    return distinct[0] if len(distinct) == 1 else MIXED


def resolve_case_attributes(attributes, kept=None):
    """{name: token} for a record from a SourceCase's `attributes`: image-level values given
    as a list (one token per image of the case) are combined with `case_value` over the
    indices in `kept` (the images written; all when None); plain tokens pass unchanged."""
    out = {}
    for name, value in (attributes or {}).items():
        if isinstance(value, (list, tuple)):
            picked = value if kept is None else [value[i] for i in kept]
            value = case_value(picked)
        out[name] = value
    return out
