"""Validate every row of the raw table (:mod:`preprocessing.read.raw`) against the schema.

Each declared column is cast with ``try_cast`` (from the string a text input holds, or from
a typed input's stored type, see :mod:`preprocessing.read.schema_policy`): this is what lets
a bad value be quarantined with the column it came from, instead of Spark silently nulling it.

Each row gets ``_reason`` (null when the row is good) and ``_reason_column``: the first
reason of :data:`preprocessing.read.reasons.REASONS` (the table of codes, in priority order)
that applies; the key and label checks first, then the tabular features, then the array,
image (missing) and text checks column by column in ``etl.schema`` order, and last what
decoding the images finds (unreadable, invalid, too large), column by column.

A text column holds a string of any content; a JSON number or object in its place is read as
its JSON text (Spark's JSON reader), and a typed input's number is cast to its decimal text,
as for any string column. Images are decoded with Pillow in the executors
(:mod:`preprocessing.read.images`), once per row: here, before the checks run, or — the ETL's
choice, ``decode_images=False`` — by the shard writers, after every other check has passed
(which is why the decode reasons rank last: the two placements quarantine the same rows with
the same reasons).

With ``missing: impute`` (the default) null / NaN / ±inf numeric values become null here and
are imputed later with the train-split statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from preprocessing.config import EtlConfig, is_array
from preprocessing.read import reasons as R
from preprocessing.read.arrays import array_checks, typed_array
from preprocessing.read.imagedecode import IMAGE_REASONS
from preprocessing.read.images import decode_images, image_error, image_pixels, image_sums
from preprocessing.read.raw import CORRUPT, SOURCE, RawInput
from preprocessing.read.schema_policy import exact_cast
from preprocessing.sqltext import quote, sql_double, sql_string

__all__ = [
    "QUARANTINED",
    "REASON",
    "REASON_COLUMN",
    "quarantined_columns",
    "validate",
    "validate_features",
]

REASON = "_reason"
REASON_COLUMN = "_reason_column"
RAW_PREFIX = "_raw_"
QUARANTINED = "_quarantined"
_TYPED = "_typed_"
_CODE = "_reason_code"
_KEEP_RAW = "_keep_raw"


def _blank_sql(column: str, trimmed: bool) -> str:
    """SQL text: the column is null or empty (after trimming, unless the parser ``trimmed``)."""
    value = f"CAST({quote(column)} AS STRING)"
    return f"({quote(column)} IS NULL OR {value if trimmed else f'trim({value})'} = '')"


def _finite_sql(x: str) -> str:
    """SQL text: the double expression ``x`` is neither NaN nor ±inf (false for null)."""
    return f"(NOT isnan({x}) AND abs({x}) != {sql_double(float('inf'))})"


def validate(raw: RawInput, cfg: EtlConfig, *, decode_images: bool = True) -> DataFrame:
    """Typed declared columns + ``_reason`` / ``_reason_column`` + what quarantine keeps.

    ``decode_images=False`` leaves each image column as read (its bytes, or the path / URI to
    read) and checks only that it is there: the decode reasons are left to the shard writers.

    Output columns: every declared column with its declared type, ``_reason``,
    ``_reason_column`` and ``_quarantined``: null on good rows; on quarantined rows a struct
    of ``_raw_<col>`` (each declared value as read, as a string; image bytes as binary),
    ``_source_file`` and ``_corrupt_record``. One struct instead of a column per value keeps
    the cached rows narrow (the ETL caches this DataFrame).

    Built as stacked projections so that each ``try_cast`` and the whole check chain are
    evaluated once per row: columns are cast once, the checks yield one integer code (the
    index of the first failing check), and reason, column and raw values derive from the code.
    Spark keeps the projections apart because their outputs are referenced many times.
    """
    df, checks = _coded(raw, cfg, list(cfg.schema), targets=True, decode=decode_images)
    fields = [
        f"'{RAW_PREFIX}{i}', " + (quote(c) if cfg.dtype(c) == "binary" else f"CAST({quote(c)} AS STRING)")
        for i, c in enumerate(cfg.schema)
    ]  # fmt: skip
    fields += [f"'{SOURCE}', {quote(SOURCE)}", f"'{CORRUPT}', {quote(CORRUPT)}"]
    kept = f"CASE WHEN {quote(_CODE)} IS NOT NULL THEN named_struct({', '.join(fields)}) END"
    return df.select(
        *_clean(cfg, list(cfg.schema), decoded=decode_images),
        *_reasons(checks),
        F.expr(kept).alias(QUARANTINED),
    )


def quarantined_columns(cfg: EtlConfig) -> dict[str, Column]:
    """What :func:`validate` kept of a quarantined row.

    ``{declared column: raw value}``, then ``_source_file`` and ``_corrupt_record``.
    """
    kept = F.col(QUARANTINED)
    out = {c: kept.getField(f"{RAW_PREFIX}{i}") for i, c in enumerate(cfg.schema)}
    return {**out, SOURCE: kept.getField(SOURCE), CORRUPT: kept.getField(CORRUPT)}


def validate_features(
    raw: RawInput, cfg: EtlConfig, *, keep: Sequence[str] = (), keep_prefix: str = "_in_"
) -> DataFrame:
    """The checks of :func:`validate` that concern the features, for scoring.

    The key and the label are neither required nor checked. Output columns: each ``keep``
    column unchanged as ``<keep_prefix><name>``, every feature column typed exactly as
    :func:`validate` gives it to the feature model, every array column (``array<float>``) and
    image column (decoded pixels, binary, then its ``_isum_`` sums) as the shards get them,
    ``_reason`` and ``_reason_column`` (same codes and priority as the ETL's quarantine,
    array and image reasons included; null on good rows).
    """
    features = [*cfg.numeric, *cfg.categorical, *cfg.tensor_columns]
    df, checks = _coded(raw, cfg, features, targets=False, decode=True)
    return df.select(
        *[F.col(c).alias(keep_prefix + c) for c in keep],
        *_clean(cfg, features, decoded=True),
        *_reasons(checks),
    )


def _coded(
    raw: RawInput, cfg: EtlConfig, columns: list[str], *, targets: bool, decode: bool
) -> tuple[DataFrame, list[tuple[Column, str, str]]]:
    """``raw.df`` + ``_typed_<c>`` for ``columns`` + ``_reason_code`` (index of the first failed check).

    With ``decode``, image columns are decoded from their raw column when it holds bytes (no
    typed copy travels to the Python workers); for the ETL (``targets``) the bytes of rows
    that pass every check come back null, as only quarantined rows keep them.
    """
    df = raw.df
    images = {c: _image_source(cfg, c) for c in cfg.images if c in columns}
    typed = [c for c in columns if images.get(c) != c]
    df = df.select(
        "*", *[_typed(df, c, cfg.dtype(c), raw.trimmed).alias(_TYPED + c) for c in typed]
    )
    checks = _checks(raw, cfg, columns, targets=targets, decoded=decode)
    if images and decode:
        keep = None
        if targets:
            early = [F.when(cond, F.lit(True)) for cond, _, c in checks if c not in images]
            df = df.withColumn(_KEEP_RAW, F.coalesce(*early, F.lit(False)))
            keep = _KEEP_RAW
        df = decode_images(df, cfg, images, keep)
    code = F.coalesce(*[F.when(cond, F.lit(i)) for i, (cond, _, _) in enumerate(checks)])
    return df.withColumn(_CODE, code), checks


def _image_source(cfg: EtlConfig, column: str) -> str:
    """The column the decoder reads image ``column`` from.

    As read when declared ``binary`` (bytes, or an ``image_folder``'s URI), else its typed
    string (a path; blank → null).
    """
    return column if cfg.dtype(column) == "binary" else _TYPED + column


def _clean(cfg: EtlConfig, columns: list[str], *, decoded: bool) -> list[Column]:
    """The typed ``columns`` under their own names; numeric NaN / ±inf become null.

    An array column is ``array<float>``; an image column holds its decoded pixels (binary),
    followed by its channel sums (``_isum_<c>``), or — not ``decoded`` — what the decoder
    will read (bytes, or a path / URI).
    """
    tensors = (*cfg.arrays, *cfg.images)
    out = [F.col(_TYPED + c).alias(c) for c in columns if c not in (*cfg.numeric, *tensors)]
    out += [F.col(_TYPED + c).cast("array<float>").alias(c) for c in columns if c in cfg.arrays]
    for c in (c for c in columns if c in cfg.images):
        if decoded:
            out += [F.col(image_pixels(c)).alias(c), F.col(image_sums(c))]
        else:
            out.append(F.col(_image_source(cfg, c)).alias(c))
    out += [_finite_or_null(_TYPED + c).alias(c) for c in cfg.numeric if c in columns]
    return out


def _reasons(checks: list[tuple[Column, str, str]]) -> list[Column]:
    """``_reason`` and ``_reason_column`` from ``_reason_code``."""
    code = F.col(_CODE)
    return [
        _lookup(code, [r for _, r, _ in checks]).alias(REASON),
        _lookup(code, [c or None for _, _, c in checks]).alias(REASON_COLUMN),
    ]


_SEP = "\x1f"  # joins the lookup values into one literal (split once, by constant folding)


def _lookup(code: Column, values: list[str | None]) -> Column:
    """``values[code]`` (null code → null), from one array literal.

    A few calls instead of one CASE branch per value: on a classic session every operator is
    a Py4J call, and building the validation plan took ~4 s of driver time on 27 columns.
    """
    bad = [v for v in values if v is not None and (_SEP in v or v == "")]
    if bad:
        raise ValueError(f"column name {bad[0]!r} is empty or holds the control character U+001F")
    table = F.split(F.lit(_SEP.join(v or "" for v in values)), _SEP)
    # The explicit null test is needed: on Spark 4.3, element_at(<constant array>, NULL)
    # returned the array's last element instead of null.
    return F.when(code.isNotNull(), F.nullif(F.get(table, code), F.lit("")))


def _checks(
    raw: RawInput, cfg: EtlConfig, columns: list[str], *, targets: bool, decoded: bool
) -> list[tuple[Column, str, str]]:
    """``(condition, reason, column)`` in priority order, over raw and ``_typed_`` columns.

    ``columns`` are the declared columns read (a repeated header repeats their names);
    ``targets`` adds the key and label checks.
    """

    def typed(c: str) -> Column:
        return F.col(_TYPED + c)

    def blank(c: str) -> Column:
        return F.expr(_blank_sql(c, raw.trimmed))

    checks: list[tuple[Column, str, str]] = [
        (F.col(CORRUPT).isNotNull(), R.MALFORMED_RECORD.code, "")
    ]
    if raw.text:  # one comparison of two arrays: flat, however many columns
        values = ", ".join(quote(c) if raw.trimmed else f"trim({quote(c)})" for c in columns)
        names = ", ".join(sql_string(c) for c in columns)
        checks.append((F.expr(f"array({values}) = array({names})"), R.REPEATED_HEADER.code, ""))
    if targets:
        checks.append((blank(cfg.key), R.KEY_MISSING.code, cfg.key))
        checks.append((typed(cfg.key).isNull(), R.VALUE_INVALID.code, cfg.key))
        checks.append((blank(cfg.label), R.LABEL_MISSING.code, cfg.label))
        checks.append((_label_invalid(typed(cfg.label), cfg), R.LABEL_INVALID.code, cfg.label))
    # The tabular checks as SQL text: one Py4J call each instead of one per operator.
    checks += [
        (F.expr(f"NOT {_blank_sql(c, raw.trimmed)} AND {quote(_TYPED + c)} IS NULL"), R.VALUE_INVALID.code, c)
        for c in (*cfg.numeric, *cfg.categorical)
    ]  # fmt: skip
    for c in cfg.numeric:
        x = f"CAST({quote(_TYPED + c)} AS DOUBLE)"
        finite = _finite_sql(x)
        too_large = f"{finite} AND abs({x}) > {sql_double(cfg.max_abs_value)}"
        checks.append((F.expr(too_large), R.VALUE_OUT_OF_RANGE.code, c))
        if cfg.missing == "quarantine":
            checks.append((F.expr(f"{x} IS NOT NULL AND NOT {finite}"), R.VALUE_NOT_FINITE.code, c))
            checks.append((F.expr(f"{x} IS NULL"), R.VALUE_MISSING.code, c))
    checks += _tensor_checks(raw, cfg, columns, decoded=decoded)
    return checks


def _tensor_checks(
    raw: RawInput, cfg: EtlConfig, columns: list[str], *, decoded: bool
) -> list[tuple[Column, str, str]]:
    """The checks of the array, image and text columns among ``columns``, in schema order.

    Then, ``decoded``, the image decode reasons, column by column.
    """
    out: list[tuple[Column, str, str]] = []
    decode: list[tuple[Column, str, str]] = []
    for c in columns:
        if c in cfg.arrays:
            text = isinstance(raw.df.schema[c].dataType, T.StringType)
            out += array_checks(cfg, c, F.col(c), F.col(_TYPED + c), text=text)
        elif c in cfg.images:  # missing: no value to decode (a blank path is read: unreadable)
            out.append((F.col(_image_source(cfg, c)).isNull(), R.IMAGE_MISSING.code, c))
            decode += [(F.col(image_error(c)) == F.lit(r), r, c) for r in IMAGE_REASONS]
        elif c in cfg.texts:
            out += _text_checks(cfg, c, F.col(_TYPED + c))
    return out + (decode if decoded else [])


def _text_checks(cfg: EtlConfig, column: str, typed: Column) -> list[tuple[Column, str, str]]:
    """A text column's checks; ``typed`` is null for a null, empty or blank value."""
    text = cfg.texts[column]
    out = []
    if text.empty == "quarantine":  # Spark's trim removes spaces only; \s also tabs, newlines
        out.append((typed.isNull() | typed.rlike(r"^\s*$"), R.TEXT_MISSING.code, column))
    out.append((F.length(typed) > F.lit(text.max_chars), R.TEXT_TOO_LONG.code, column))
    out.append((F.instr(typed, "\ufffd") > F.lit(0), R.TEXT_INVALID.code, column))
    return out


def _typed(df: DataFrame, column: str, dtype: str, trimmed: bool) -> Column:
    c = F.col(column)
    if is_array(dtype):
        return typed_array(df, column)
    if dtype == "binary":
        return c
    if dtype == "string":
        return F.when(~F.expr(_blank_sql(column, trimmed)), c.cast("string"))
    if dtype == "boolean":
        return F.lower(F.trim(c.cast("string"))).try_cast("boolean")
    if isinstance(df.schema[column].dataType, T.StringType) and not trimmed:
        c = F.trim(c)
    return exact_cast(c, df.schema[column].dataType, dtype)


def _finite_or_null(column: str) -> Column:
    """The column as a double, NaN / ±inf made null (missing, to be imputed)."""
    x = f"CAST({quote(column)} AS DOUBLE)"
    return F.expr(f"CASE WHEN {_finite_sql(x)} THEN {x} END")


def _label_invalid(label: Column, cfg: EtlConfig) -> Column:
    if cfg.resolved_task == "regression":
        x = label.cast("double")
        return label.isNull() | F.isnan(x) | (F.abs(x) == F.lit(float("inf")))
    bad = label.isNull()
    if cfg.classes is not None:
        allowed = [F.lit(v).cast(cfg.dtype(cfg.label)) for v in cfg.classes]
        bad = bad | ~label.isin(*allowed)
    return bad
