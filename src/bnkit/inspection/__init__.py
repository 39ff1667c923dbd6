"""Inspection built on layers and tools: explain, summary, doctor, shift."""
