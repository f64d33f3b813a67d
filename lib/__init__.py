"""Shared building blocks of train.py, gan_train.py and finetune.py (see README's file tree)."""
