"""The backdoor attacks, one module each, as `defences/` holds the defences (docs/DESIGN.md §12): their terms as pure
functions of tensors, their flags, and, for the attacks that train the encoder, the attack interface.

`badencoder`: BadEncoder (Jia et al., IEEE S&P 2022), the default of `train_badencoder.py`: its shadow set, step,
objective and the attack interface the stage-1 driver calls.
`drupe`: DRUPE (Tao et al., IEEE S&P 2024), run by `train_badencoder.py --attack drupe`.
`flags`: the flags of `train_badencoder.py`, and the attacks its `--attack` chooses from.
`ctrl`: CTRL (Li et al., ICCV 2023), which poisons data: its frequency trigger (`trigger/make_trigger.py --kind
ctrl`) and the poisoning of target-class pre-training images (`python -m datasets.poison`).
"""
