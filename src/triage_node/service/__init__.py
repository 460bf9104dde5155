"""The long-running node: the supervisor and its processes, the scheduler, study completeness,
the analysis workers, delivery of the outbox, report reconciliation, escalation and retention.

The one layer that wires the others together: it may import every run-time subpackage (``dicom``,
``hl7``, ``db``, ``analysis``, ``results``, ``ops``) but never ``training``.
"""
