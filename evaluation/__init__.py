"""How an encoder is evaluated: its features of un-augmented images, kNN classification and the kNN monitor
(`evaluation.features`), and the downstream probe's metrics. The modules are imported by name; nothing is
re-exported here.
"""
