"""Analysis on the run-time path, in numpy and ONNX Runtime (never torch): the model manifest,
what a model is for (scope), preprocessing from stored pixels to the network's input (with the
GDCM child-process decoder), the runtime session, the heatmap picture, the study pipeline and the
``triage-node infer`` file walk.

May import the foundation only; never ``db``, ``service`` or ``training``.
"""
