"""A model's input schema: named, typed columns (what a request must send, per column).

A model trained on a numeric matrix (the built-in datasets) has only `number` columns and is
served on the fast path: one float64 matrix, no pandas. A Pipeline fitted on a DataFrame
(strings, booleans, missing values) has typed columns; requests are checked column by column
against this schema before anything reaches the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ColumnKind = Literal["number", "integer", "boolean", "string"]
# The Open Inference Protocol V2 datatype each kind travels as (MLServer's pandas codec and
# tritonclient use the same convention: one named input per column).
V2_DATATYPES: dict[str, str] = {"number": "FP64", "integer": "INT64", "boolean": "BOOL", "string": "BYTES"}


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: ColumnKind
    nullable: bool = False
    """Whether a null (JSON null, NaN, None) may be sent: the training sample had missing values
    and the model handles them."""
    categories: tuple[str, ...] | None = None
    """For `string` columns: the categories seen in training, sorted."""
    unknown_categories: Literal["refused", "allowed"] = "refused"
    """Whether a category never seen in training may be sent (allowed where the model handles
    it, e.g. OneHotEncoder(handle_unknown="ignore"))."""

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPES[self.kind]


class InputSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    @property
    def all_numeric(self) -> bool:
        """True when requests can be one float64 matrix (the fast path)."""
        return all(column.kind == "number" and not column.nullable for column in self.columns)

    def column(self, name: str) -> Column | None:
        return next((column for column in self.columns if column.name == name), None)

    @classmethod
    def numeric(cls, names: list[str]) -> "InputSchema":
        return cls(columns=tuple(Column(name=name, kind="number") for name in names))
