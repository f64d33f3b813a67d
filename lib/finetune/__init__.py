"""Transfer learning for finetune.py, one job per module: preflight.py checks the finetune section,
build.py builds the model with the pretrained weights (loaded by lib/models/weights.py), a head for
the data and a first convolution for its channels, freeze.py freezes and later unfreezes layers, and
export.py writes model.pt with a train.py config that evaluates it.
"""
