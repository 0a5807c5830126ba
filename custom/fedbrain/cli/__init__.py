"""The ``fedbrain`` command line: ``main.py`` builds the parser from one module per command group.

Nothing outside this package imports it; its modules call the library (data, training, experiments, fl,
compression, dashboard) and print.
"""
