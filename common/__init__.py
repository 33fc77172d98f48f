"""What the four stage scripts share: the parent parser, device and seed set-up, run directories."""
