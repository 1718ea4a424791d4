"""Tests of callahead.smtp."""
