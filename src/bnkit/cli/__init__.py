"""bnkit.cli"""
