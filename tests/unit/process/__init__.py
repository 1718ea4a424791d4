"""Tests of callahead.process."""
