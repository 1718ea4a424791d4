"""Tests of callahead.routing."""
