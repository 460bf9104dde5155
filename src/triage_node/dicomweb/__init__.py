"""DICOMweb (PS3.18): the STOW-RS receiver — the same promise as C-STORE over HTTP(S).

Owns cheroot (the HTTP server) and python-multipart (the streaming body parser). Like
``dicom/``, it is handed the spool and the database's intake by the service and never imports
``db``; it may import the foundation and ``dicom`` (the header reader and storage status codes).
"""
