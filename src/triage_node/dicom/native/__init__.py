"""The DCMTK transport of the DICOM port (``dicom.transport = "dcmtk"``): a DCMTK program
(``dcmtk_receiver.cpp``, built by :mod:`.build`) serves the associations a receiver process
admitted, and the receiver process (:mod:`.handover`) decides, stores and records."""
