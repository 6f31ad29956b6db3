"""Not code: this file makes ``configs`` a regular package for gin's include lookup.

gin resolves ``include 'configs/base.gin'`` against each search path, and for each it also asks
whether ``configs`` is an importable Python package holding the file. When the repository is on
``sys.path`` (PYTHONPATH) but the working directory is elsewhere, a folder without this file is
a namespace package, and gin 0.5.0 fails on it with a TypeError instead of trying the next path.
"""
