"""The quarantine reasons: every code a row can be rejected with, in one table.

The ETL writes a rejected row to ``quarantine/`` with its reason (``_reason``) and column
(``_reason_column``); scoring returns the feature reasons as ``score_error``. Users filter
those tables by code, so a code never changes. :mod:`preprocessing.read.validation` (and
:mod:`~preprocessing.read.arrays`, :mod:`~preprocessing.read.imagedecode`) take their codes
from here; :data:`REASONS` is in priority order (the first that applies wins; the array, image
and text checks run column by column, in ``etl.schema`` order, and what decoding the images
finds comes after all of them). The README's list is
generated from it (``python -m jobs.reasonsref --write README.md``, part of ``make docs``).

Spark-free: the image decoder imports it in the Python workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "ARRAY_INVALID",
    "ARRAY_MISSING",
    "IMAGE_INVALID",
    "IMAGE_MISSING",
    "IMAGE_TOO_LARGE",
    "IMAGE_UNREADABLE",
    "KEY_MISSING",
    "KINDS",
    "LABEL_INVALID",
    "LABEL_MISSING",
    "MALFORMED_RECORD",
    "REASONS",
    "REPEATED_HEADER",
    "TEXT_INVALID",
    "TEXT_MISSING",
    "TEXT_TOO_LONG",
    "VALUE_INVALID",
    "VALUE_MISSING",
    "VALUE_NOT_FINITE",
    "VALUE_OUT_OF_RANGE",
    "Reason",
]

KINDS: Final = ("record", "key", "label", "numeric", "categorical", "array", "image", "text")
"""What a reason can apply to: the whole record, or a column of one of these kinds."""


@dataclass(frozen=True)
class Reason:
    """One quarantine reason: its ``code``, the column kinds it applies to, what it means."""

    code: str
    kinds: tuple[str, ...]
    """:data:`KINDS` it applies to (``record``: the whole row, no column)."""
    meaning: str
    """When a row gets it (Markdown: rendered into the README)."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or unknown:
            raise ValueError(f"reason {self.code!r}: kinds {self.kinds} must be among {KINDS}")

    @property
    def scored(self) -> bool:
        """Scoring checks it too (it concerns the record or a feature, not the key / label)."""
        return any(k not in ("key", "label") for k in self.kinds)


MALFORMED_RECORD: Final = Reason(
    "malformed_record",
    ("record",),
    "the parser could not split the line into the declared fields (too few / too many "
    "fields, unterminated quote, broken JSON)",
)
REPEATED_HEADER: Final = Reason(
    "repeated_header", ("record",), "a header line in the middle of the data"
)
KEY_MISSING: Final = Reason("key_missing", ("key",), "the split key is null or empty")
LABEL_MISSING: Final = Reason("label_missing", ("label",), "the label is null or empty")
LABEL_INVALID: Final = Reason(
    "label_invalid",
    ("label",),
    "the label does not parse as its type (`0.5` for an int label), is not one of "
    "`etl.classes`, or is not finite (regression)",
)
VALUE_INVALID: Final = Reason(
    "value_invalid",
    ("key", "numeric", "categorical"),
    "the value does not parse as its declared type (invalid UTF-8 in a numeric column too)",
)
VALUE_OUT_OF_RANGE: Final = Reason(
    "value_out_of_range", ("numeric",), "a finite value with `|x| > etl.max_abs_value`"
)
VALUE_NOT_FINITE: Final = Reason(
    "value_not_finite", ("numeric",), "NaN / ±inf, with `missing: quarantine`"
)
VALUE_MISSING: Final = Reason(
    "value_missing", ("numeric",), "a null value, with `missing: quarantine`"
)
ARRAY_MISSING: Final = Reason(
    "array_missing", ("array",), "the value is null (or an empty text field)"
)
ARRAY_INVALID: Final = Reason(
    "array_invalid",
    ("array",),
    "not a flat list of numbers (nested, a string element, broken JSON), not exactly "
    "`prod(shape)` elements, or an element that is null, NaN, ±inf or beyond float32's range",
)
IMAGE_MISSING: Final = Reason(
    "image_missing", ("image",), "a null or empty path, or a null bytes value"
)
IMAGE_UNREADABLE: Final = Reason(
    "image_unreadable",
    ("image",),
    "the path / URI cannot be read (missing, a directory, no permission, an unknown URI scheme)",
)
IMAGE_INVALID: Final = Reason(
    "image_invalid",
    ("image",),
    "the bytes are not a decodable image (empty, truncated, corrupt, not an image)",
)
IMAGE_TOO_LARGE: Final = Reason(
    "image_too_large",
    ("image",),
    "the header claims more than `max_pixels` pixels (checked before any pixel is decoded)",
)
TEXT_MISSING: Final = Reason(
    "text_missing", ("text",), "a null, empty or whitespace-only text, with `empty: quarantine`"
)
TEXT_TOO_LONG: Final = Reason(
    "text_too_long", ("text",), "a text of more than `max_chars` characters"
)
TEXT_INVALID: Final = Reason(
    "text_invalid",
    ("text",),
    "a text holding U+FFFD: invalid UTF-8 in a CSV, as the reader decodes it (in JSON input "
    "Spark's parser rejects the line: `malformed_record`)",
)

REASONS: Final = (
    MALFORMED_RECORD,
    REPEATED_HEADER,
    KEY_MISSING,
    LABEL_MISSING,
    LABEL_INVALID,
    VALUE_INVALID,
    VALUE_OUT_OF_RANGE,
    VALUE_NOT_FINITE,
    VALUE_MISSING,
    ARRAY_MISSING,
    ARRAY_INVALID,
    IMAGE_MISSING,
    TEXT_MISSING,
    TEXT_TOO_LONG,
    TEXT_INVALID,
    IMAGE_UNREADABLE,
    IMAGE_INVALID,
    IMAGE_TOO_LARGE,
)
"""Every reason, in priority order (a key that does not parse, ``value_invalid``, comes right
after ``key_missing``). What decoding an image finds comes last: the ETL may decode the
images in the shard writers, after every other check has passed."""
