"""Weight files and deployment: atomic safetensors / weights-only torch I/O, ONNX export with onnxruntime checks."""
from .keymap import KeyMap, KeyRule, check_state_dict, make_filter, remap_state_dict
from .io import (
    IncompatibleKeysError, LoadResult, WeightsFileError, atomic_write, load_into, load_weights, save_weights,
)
from .onnx import OnnxExportError, export_onnx, onnx_run
from .sources import NoPretrainedWeightsError

__all__ = [
    'IncompatibleKeysError', 'LoadResult', 'WeightsFileError', 'atomic_write', 'load_into', 'load_weights',
    'save_weights', 'OnnxExportError', 'export_onnx', 'onnx_run', 'NoPretrainedWeightsError',
    'KeyMap', 'KeyRule', 'check_state_dict', 'make_filter', 'remap_state_dict',
]
