"""Content filtering in Azure OpenAI's shape, and the classifiers behind it.

One module per concept::

    severity    Azure's four categories and severities, the classifier contract, and the
                ``content_filter_results`` shapes
    texts       the texts of a request (the prompt) and of its answer (the choices), by endpoint
    embedded    the embedded classifier: per-category heads over MiniLM sentence embeddings
    remote      a deployment as the classifier: a ``/v1/moderations`` server or a guard model
    moderation  OpenAI's moderation response built from the four categories

The engine's hook is :mod:`batchd.engine.content_filter`; the ``/v1/moderations`` local
deployment is :mod:`batchd.backends.moderation`. Nothing here is built at import time.
"""
