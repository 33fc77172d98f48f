"""Backdoor attacks beyond BadEncoder's losses (docs/DESIGN.md §12): each attack's terms as pure functions of tensors.

`drupe`: DRUPE (Tao et al., IEEE S&P 2024), run by `train_badencoder.py --attack drupe`.
"""
