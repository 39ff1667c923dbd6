"""Framework-free code shared by the PyTorch tools and bnkit.keras: tables, summaries, layer selection.

Imports neither torch nor keras (tests/test_architecture.py checks it), so both sides can use it.
"""
