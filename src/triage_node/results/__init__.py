"""The result objects written back into the study (architecture.md, "result contract"), built
with highdicom (its only importer): the TID 1500 Structured Report, the heatmap Secondary
Capture and the Key Object Selection, their shared codes and UIDs, and how they are made durable
in the spool.

May import the foundation and ``analysis`` (its records); never ``db`` or ``service``.
"""
