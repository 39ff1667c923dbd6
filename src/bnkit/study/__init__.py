"""bnkit.study"""
