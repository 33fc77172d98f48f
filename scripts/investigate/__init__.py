"""Tools that investigate the implementation itself, each run from the repository root as
`python -m scripts.investigate.<tool>`:

    compare_original  this implementation's speed against the original MIMIC code's, on the same machine
                      (original_harness: its child process, which times the original; not run by hand)
    sweep_shapes      every stage over a grid of small shapes: no input may end a run by a signal
"""
