"""Training support for `main.py` (PyTorch Lightning 2): data module, callbacks, checkpoint I/O, run directories."""
