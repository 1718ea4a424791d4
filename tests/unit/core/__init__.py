"""Tests of callahead.core."""
