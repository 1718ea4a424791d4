"""Tests of callahead.probing."""
