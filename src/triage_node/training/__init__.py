"""The ``[train]`` extra: labelled folders and their splits, the networks (scratch and
ImageNet-pretrained), augmentation, the training loop, calibration and the scope guard's
statistics, export to a model directory, evaluation, statistics and plots.

Only this subpackage imports torch (evaluation and statistics do not need it); it may import
``analysis`` (training reads images as the runtime does). Nothing outside it and the CLI imports
it.
"""
