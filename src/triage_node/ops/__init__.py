"""What an admin sees: the status collection behind ``triage-node status``, its text rendering,
and the Prometheus exporter.

May import the foundation, ``db`` and ``analysis`` (the model manifest); never ``service`` or
``training``.
"""
