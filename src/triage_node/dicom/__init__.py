"""DICOM networking, and the only importer of pynetdicom: the Verification and Storage SCP
(handlers, the socket server with its allow-lists, TLS and rejections), the Storage and Find SCUs
that talk to the PACS, and the DIMSE status values they answer with (PS3.7 Annex C).

May import the foundation (``errors``, ``domain``, ``logs``, ``config``, ``spool``); never ``db``
or ``service`` at run time: the aggregates a handler records into are passed in when it is bound.
"""
