"""Shared machinery of the sampling command lines (scripts/txt2img.py, scripts/img2img.py).

`common` imports nothing heavy, so argument mistakes are reported before torch loads;
the other modules are imported once the arguments have been checked.
"""
