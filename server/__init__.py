"""gRPC inference and audit server over ONNX Runtime (never imports torch)."""
