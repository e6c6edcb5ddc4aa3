"""Every Prometheus metric the server exports, in one place. Units are in the names.

The registry is passed in, so tests build a fresh one per server.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
AUDIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
AUDIT_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "dcs_requests_total", "RPCs handled, by method, model and gRPC status code.",
            ["method", "model", "code"], registry=registry)
        self.request_seconds = Histogram(
            "dcs_request_duration_seconds", "Total RPC latency, seconds.", ["method", "model"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_seconds = Histogram(
            "dcs_queue_duration_seconds", "Time a request waited in the batch queue, seconds.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.compute_seconds = Histogram(
            "dcs_compute_duration_seconds", "ONNX Runtime time per batch, seconds.", ["model"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram(
            "dcs_batch_size_examples", "Examples per executed batch.", ["model"],
            buckets=BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            "dcs_queue_depth_requests", "Requests waiting in the batch queue.", ["model"],
            registry=registry)
        self.inflight = Gauge(
            "dcs_inflight_requests", "RPCs being handled.", ["method"], registry=registry)
        self.model_info = Gauge(
            "dcs_model_info", "Loaded model packages (1 = serving).",
            ["model", "version", "sha256", "provider"], registry=registry)
        self.load_failures = Counter(
            "dcs_model_load_failures_total", "Packages that failed to load or verify.", ["model"],
            registry=registry)
        self.provider_fallbacks = Counter(
            "dcs_provider_fallback_total",
            "Sessions that run on CPU although device=auto or CUDA was available.", ["model"],
            registry=registry)
        self.models_loaded = Gauge(
            "dcs_models_loaded", "Models currently serving.", registry=registry)
        # audits
        self.audits = Gauge("dcs_audits", "Audit jobs by state.", ["state"], registry=registry)
        for state in AUDIT_STATES:
            self.audits.labels(state).set(0)
        self.audit_seconds = Histogram(
            "dcs_audit_duration_seconds", "Wall time of finished audit jobs, seconds.", ["state"],
            buckets=AUDIT_BUCKETS, registry=registry)
        self.audit_gradients = Counter(
            "dcs_audit_gradient_evaluations_total",
            "Per-example gradient evaluations made by audits.", registry=registry)
        self.audit_logits = Counter(
            "dcs_audit_logit_evaluations_total",
            "Per-example logit evaluations made by audits.", registry=registry)

        self._request_children: dict[tuple[str, str, str], tuple] = {}

    def observe_request(self, method: str, model: str, code: str, seconds: float) -> None:
        key = (method, model, code)
        children = self._request_children.get(key)
        if children is None:  # ``labels()`` takes a lock and builds a key: once per label set
            children = self._request_children[key] = (self.requests.labels(method, model, code),
                                                      self.request_seconds.labels(method, model))
        children[0].inc()
        children[1].observe(seconds)

    def set_model(self, model: str, version: int, sha256: str, provider: str) -> None:
        """Record the serving package of ``model`` (drops the previous version's series)."""
        for sample in list(self.model_info.collect()[0].samples):
            if sample.labels.get("model") == model:
                self.model_info.remove(model, sample.labels["version"], sample.labels["sha256"],
                                       sample.labels["provider"])
        self.model_info.labels(model, str(version), sha256, provider).set(1)

    def drop_model(self, model: str) -> None:
        for sample in list(self.model_info.collect()[0].samples):
            if sample.labels.get("model") == model:
                self.model_info.remove(model, sample.labels["version"], sample.labels["sha256"],
                                       sample.labels["provider"])
