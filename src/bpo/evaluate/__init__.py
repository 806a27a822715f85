"""Hallucination metrics and benchmark runners."""
