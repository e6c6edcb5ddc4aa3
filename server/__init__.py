"""gRPC inference and audit server over ONNX Runtime (never imports torch).

Layers (servicer → data plane → model):

- ``config``       frozen ``ServerConfig``; defaults < YAML/TOML file < ``DCS_*`` env < flags
- ``errors``       ``ServiceError`` subclasses, each with a class-level status ``code``
- ``interceptor``  the one place errors become gRPC statuses; per-RPC metrics
- ``metrics``      every Prometheus metric (registry passed in)
- ``runtime``      a loaded, sha-verified package and its classify ORT session
- ``batcher``      per-model dynamic batching with a bounded queue
- ``repository``   scan / verify / hot-swap packages; failures logged, counted, skipped
- ``dataplane``    lookup, readiness, validation, inference, top-k (shared by both APIs)
- ``servicers``    classifier.v1.Classifier and inference.GRPCInferenceService (KServe v2)
- ``jobs``, ``audit``, ``audit_servicer``   audit jobs: SQLite store, worker pool, gRPC
- ``app``          assembly, health, reflection, TLS, signals, bounded graceful stop
- ``__main__``     ``dcs-server`` / ``python -m dcs.server``
"""
