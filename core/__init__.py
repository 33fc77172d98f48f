"""The bottom layer: generic pieces that every other package builds on, free of the project (no module here imports
another package of the repository).

`errors` (the error classes and their exit statuses), `files` (atomic file writing), `device` (the device and
precision decision), `processes` (which process of a torchrun job this is, and how it ends), `cli` (the one-line-error
parser, the `same_on_resume` flag mark and `run_main`, the wrapper every command-line entry point runs under).
"""
