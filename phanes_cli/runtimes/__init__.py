"""Accelerated inference runtimes: exported ONNX graphs run by ONNX Runtime, TensorRT engines, and the
choice between them and eager torch (`select.choose_backend`)."""
