"""Model layer: MobileCLIP-S2 as data and as code.

Owns the model identity (architecture, weights, dimension, preprocessing), the tokenizer,
the encoders (torch in ``torch_encoder.py``, ONNX Runtime in ``onnx_encoder.py``, chosen by
``encoders.py``) and the ONNX export. It imports only the base modules (``indexer.errors``,
``indexer.paths``, ``indexer.fsutil``). It is the one home of torch, open_clip and timm
(``torch_encoder.py`` and ``onnx_export.py`` only) and of onnx/onnxruntime.
"""
