"""MMC4 (and ChatGPT-sequence) downloads -> training shards; see `of_ds.convert.run` and docs/architecture.md."""

from of_ds.convert.inputs import ConvertError
from of_ds.convert.run import ConvertOptions, convert

__all__ = ["ConvertError", "ConvertOptions", "convert"]
