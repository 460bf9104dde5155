"""HL7 v2: message parsing and building (report notices of ORU^R01, acknowledgements, the RIS
priority update of an escalation) and the MLLP framing they travel in.

May import the foundation only; never ``db`` or ``service``.
"""
