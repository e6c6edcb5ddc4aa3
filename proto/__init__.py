"""Protocol definitions and their generated stubs (``make proto`` regenerates them).

- ``proto/classifier.proto``: ``classifier.v1`` (Classifier and Audit services).
- ``proto/grpc_predict_v2.proto``: the KServe v2 / Open Inference Protocol subset (``inference``).

Import the generated modules as ``from proto import classifier_pb2, classifier_pb2_grpc``.
"""
