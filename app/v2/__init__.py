"""The Open Inference Protocol (KServe V2) over REST, beside ``/v1`` on the same app.

Health, server and model metadata, model readiness and inference, with the binary tensor
data and classification extensions. A request sends one input: ``images`` (BYTES ``[N]``,
encoded image files, decoded exactly like ``/v1`` uploads) or ``input`` (FP32
``[N, 3, H, W]``, the normalised network input); the output ``probabilities`` is FP32
``[N, classes]``, or with ``classification: k`` the top k as ``"probability:index:label"``.
Both kinds of input share the version's batcher, limits and metrics with ``/v1``.

Modules: ``schemas`` (bodies), ``codec`` (the wire: body, tensors, binary data),
``service`` (the use cases), ``routes`` (the router that app.main includes).
"""
