"""Text tables and row lists: moved to :mod:`bnkit.shared.table` (framework-free, shared with bnkit.keras)."""

from bnkit.shared.table import RowList, format_cell, text_table

__all__ = ["RowList", "format_cell", "text_table"]
