"""What the stage scripts share: the parent parser and seed set-up, run directories, the training engine,
multi-process training, and stage 0's flags and epoch."""
