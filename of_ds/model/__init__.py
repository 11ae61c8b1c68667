"""The Flamingo model: `build_flamingo(model_spec) -> (Flamingo, image_processor, tokenizer)`."""

from .build import build_flamingo, count_parameters
from .flamingo import Flamingo, FlamingoOutput
from .labels import build_labels
from .vision import ImageProcessorConfig, image_processor_config

__all__ = [
    "Flamingo",
    "FlamingoOutput",
    "ImageProcessorConfig",
    "build_flamingo",
    "build_labels",
    "count_parameters",
    "image_processor_config",
]
