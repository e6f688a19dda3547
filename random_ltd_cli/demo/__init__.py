"""The demo and the quality benchmark's building blocks (imports torch; the CLI loads it lazily).

- :mod:`.data`: byte-level corpus of the stdlib's ``*.py`` files, fixed eval split, shared batches.
- :mod:`.train`: the training loop for one arm (baseline or random-LTD), interleaved over arms.
- :mod:`.plot`: eval-loss curves as PNG (optional matplotlib).
- :mod:`.proof`: save the random-LTD checkpoint, inspect it, strip it, load it back strictly.
- :mod:`.run`: the whole demo, ``run_demo(DemoConfig.default(), out_dir)``.
"""
