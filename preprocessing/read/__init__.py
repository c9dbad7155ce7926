"""Read the raw table and validate every row against the declared schema.

:mod:`~preprocessing.read.raw` reads the input with the declared columns (strings for text
formats); :mod:`~preprocessing.read.schema_policy` decides what a typed input's missing or
differently stored columns mean; :mod:`~preprocessing.read.validation` casts every value and
gives each row its quarantine reason. The ETL and scoring use the names exported here.
"""

from preprocessing.read.missing import missing_input_as_config_error
from preprocessing.read.raw import CORRUPT, SOURCE, RawInput, read_raw
from preprocessing.read.schema_policy import SchemaMismatchError, require_columns
from preprocessing.read.validation import (
    REASON,
    REASON_COLUMN,
    quarantined_columns,
    validate,
    validate_features,
)

__all__ = [
    "CORRUPT",
    "REASON",
    "REASON_COLUMN",
    "SOURCE",
    "RawInput",
    "SchemaMismatchError",
    "missing_input_as_config_error",
    "quarantined_columns",
    "read_raw",
    "require_columns",
    "validate",
    "validate_features",
]
